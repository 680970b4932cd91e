"""Data pipeline: corpora, sources, prepare (token files) and the loaders."""

import dataclasses
import functools
import http.server
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.data import (
    CORPORA,
    Prepared,
    SlidingWindowDataset,
    TokenLoader,
    create_dataloader,
    data_dir,
    fetch_corpus,
    prepare,
    resolve_source,
    sha256_file,
    split_for_tokenizer,
    token_dtype,
    unigram_loss,
)
from llm.tokenizer import EOT_TOKEN, get_tokenizer

SHARED_DATA = os.environ.get("LLM_DATA_DIR")


@pytest.fixture(scope="module")
def tok():
    # No skip when the vocabulary is missing: a test run without it is broken, not green (its error
    # names TIKTOKEN_CACHE_DIR).  Online, tiktoken downloads it.
    return get_tokenizer()


@pytest.fixture(scope="module")
def verdict_path() -> Path:
    return fetch_corpus("the-verdict")  # offline without LLM_DATA_DIR this fails, naming LLM_DATA_DIR


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh LLM_CACHE_DIR for tests that count what prepare writes."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LLM_CACHE_DIR", str(path))
    return path


class CountingTokenizer:
    """The real tokenizer, counting calls, so tests can tell whether prepare tokenized."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner = inner
        self.name, self.n_vocab, self.eot_token = inner.name, inner.n_vocab, inner.eot_token
        self.calls = 0
        self.fail_after = fail_after

    def _count(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated Ctrl-C in the middle of tokenizing")

    def encode(self, text):
        self._count()
        return self.inner.encode(text)

    def encode_batch(self, texts):
        self._count()
        return self.inner.encode_batch(texts)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Corpora


@pytest.mark.skipif(not SHARED_DATA, reason="LLM_DATA_DIR not set")
@pytest.mark.parametrize("name", ["tinyshakespeare", "the-verdict"])
def test_registry_sha256_matches_shared_files(name):
    before = sorted(os.listdir(data_dir()))
    path = fetch_corpus(name)
    assert path == data_dir() / CORPORA[name].filename
    assert sha256_file(path) == CORPORA[name].sha256
    assert sorted(os.listdir(data_dir())) == before  # a present file means nothing is written


@pytest.mark.skipif(not SHARED_DATA, reason="LLM_DATA_DIR not set")
@pytest.mark.parametrize("name", ["instruction-data", "instruction-data-with-preference", "gsm8k", "humaneval"])
def test_dataset_registry_sha256_matches_shared_files(name):
    from llm.data import DATASETS, fetch_dataset

    path = fetch_dataset(name)
    assert path == data_dir() / DATASETS[name].filename
    assert sha256_file(path) == DATASETS[name].sha256
    with pytest.raises(ValueError, match="known datasets: gsm8k"):
        fetch_dataset("no-such-set")
    with pytest.raises(ValueError, match="unknown corpus 'gsm8k'"):
        fetch_corpus("gsm8k")  # benchmarks are not pretraining corpora


def test_data_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("LLM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "llm-from-scratch" / "data"


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    write(tmp_path / "the-verdict.txt", "not the story you were looking for")
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        fetch_corpus("the-verdict")
    msg = str(err.value)
    assert "checksum mismatch" in msg
    for part in ["the-verdict", CORPORA["the-verdict"].url, str(tmp_path / "the-verdict.txt"), "LLM_DATA_DIR"]:
        assert part in msg
    assert (tmp_path / "the-verdict.txt").read_text() == "not the story you were looking for"


def test_offline_download_fails_fast_with_clear_error(tmp_path, monkeypatch):
    """The real URL: on this offline machine it must fail quickly and say what to do."""
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path))
    start = time.monotonic()
    try:
        path = fetch_corpus("the-verdict", timeout=5)
    except RuntimeError as e:
        msg = str(e)
        for part in ["the-verdict", CORPORA["the-verdict"].url, str(tmp_path / "the-verdict.txt"), "LLM_DATA_DIR"]:
            assert part in msg
        assert list(tmp_path.iterdir()) == []  # no half-downloaded file left behind
    else:  # a machine with internet: then the download must have been verified
        assert sha256_file(path) == CORPORA["the-verdict"].sha256
    assert time.monotonic() - start < 30


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    """Deterministic offline case, whatever the network: nothing listens on port 9."""
    bad = dataclasses.replace(CORPORA["the-verdict"], url="http://127.0.0.1:9/the-verdict.txt")
    monkeypatch.setitem(CORPORA, "the-verdict", bad)
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path / "data"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="download failed.*LLM_DATA_DIR"):
        fetch_corpus("the-verdict", timeout=2)
    assert time.monotonic() - start < 10


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server for ``tmp_path / "www"``, so the download path runs offline."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_renames(tmp_path, monkeypatch, http_server, verdict_path):
    root, url = http_server
    shutil.copy(verdict_path, root / "good.txt")
    write(root / "bad.txt", "tampered")
    data = tmp_path / "data"
    monkeypatch.setenv("LLM_DATA_DIR", str(data))

    monkeypatch.setitem(CORPORA, "the-verdict", dataclasses.replace(CORPORA["the-verdict"], url=f"{url}/bad.txt"))
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_corpus("the-verdict", timeout=5)
    assert list(data.iterdir()) == []  # the bad download was not kept

    monkeypatch.setitem(CORPORA, "the-verdict", dataclasses.replace(CORPORA["the-verdict"], url=f"{url}/good.txt"))
    path = fetch_corpus("the-verdict", timeout=5)
    assert path == data / "the-verdict.txt"
    assert sha256_file(path) == CORPORA["the-verdict"].sha256
    assert [p.name for p in data.iterdir()] == ["the-verdict.txt"]


# --------------------------------------------------------------------------------------------
# Sources


def test_corpus_name_source(verdict_path):
    docs = resolve_source("the-verdict")
    assert [d.path for d in docs] == [verdict_path]


def test_file_folder_and_glob_sources(tmp_path):
    a = write(tmp_path / "corpus" / "b.txt", "bee")
    b = write(tmp_path / "corpus" / "a.txt", "ay")
    c = write(tmp_path / "corpus" / "sub" / "c.txt", "sea")
    write(tmp_path / "corpus" / "notes.md", "not text")

    assert [d.path for d in resolve_source(str(a))] == [a]
    assert [d.path for d in resolve_source(str(tmp_path / "corpus"))] == [b, a, c]  # sorted, recursive
    assert [d.path for d in resolve_source(str(tmp_path / "corpus" / "*.txt"))] == [b, a]
    assert [d.path for d in resolve_source(str(tmp_path / "**" / "*.txt"))] == [b, a, c]
    assert [d.path for d in resolve_source(str(tmp_path / "corpus" / "*.md"))][0].name == "notes.md"


def test_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_source(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=r"\*.xyz"):
        resolve_source(str(tmp_path / "*.xyz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="tinyshakespeare.*the-verdict|the-verdict.*tinyshakespeare"):
        resolve_source("tiny-shakespear")


def test_hf_source_on_local_file(tmp_path, tok, cache):
    pytest.importorskip("datasets")
    lines = ["First line of the file.", "", "Second line, after an empty one.", "Third."]
    path = write(tmp_path / "small.txt", "\n".join(lines) + "\n")
    hf = dict(hf_data_files=str(path), hf_cache_dir=tmp_path / "hf")

    docs = resolve_source("hf:text", **hf)
    assert [d.text for d in docs] == lines  # the "text" builder: one row per line

    prepared = prepare("hf:text", val_fraction=0.0, tokenizer=tok, progress=False, **hf)
    expected = []
    for line in [line for line in lines if line]:  # empty rows are skipped, not double separators
        expected += ([EOT_TOKEN] if expected else []) + tok.encode(line)
    assert prepared.train_tokens().tolist() == expected
    assert prepared.meta["n_docs"] == 3
    assert prepared.dir.name.startswith("hf-text-")


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        resolve_source("hf:wikitext:wikitext-2-raw-v1")


# --------------------------------------------------------------------------------------------
# prepare


def test_prepare_single_file_and_val_split(tok, cache, verdict_path):
    prepared = prepare("the-verdict", val_fraction=0.1, tokenizer=tok, progress=False)
    full = tok.encode(verdict_path.read_text(encoding="utf-8"))
    train, val = prepared.train_tokens(), prepared.val_tokens()
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    n_val = round(len(full) * 0.1)
    assert len(val) == n_val and len(train) == len(full) - n_val
    assert train.tolist() == full[:-n_val]  # val is the contiguous tail of the stream
    assert val.tolist() == full[-n_val:]
    meta = prepared.meta
    assert meta["n_train_tokens"] == len(train) and meta["n_val_tokens"] == n_val
    assert meta["n_docs"] == 1 and meta["tokenizer"] == "gpt2" and meta["val_fraction"] == 0.1
    assert meta["sha256"] == CORPORA["the-verdict"].sha256
    assert prepared.dir.parent == cache / "tokens" and prepared.dir.name.startswith("the-verdict-")
    assert json.loads((prepared.dir / "meta.json").read_text()) == meta
    assert unigram_loss(train, val) < math.log(50257)


class BigVocabTokenizer:
    """A stand-in for Llama 3's 128,256 ids: every character becomes an id above 65,535."""

    name, n_vocab, eot_token = "big-vocab-test", 128_256, 128_001

    def encode(self, text):
        return [100_000 + ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_token_files_are_uint32_for_a_vocabulary_over_65536(tmp_path, cache):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_669) == np.uint32
    write(tmp_path / "docs" / "a.txt", "abc")
    write(tmp_path / "docs" / "b.txt", "de")
    prepared = prepare(str(tmp_path / "docs"), val_fraction=0.25, tokenizer=BigVocabTokenizer(), progress=False)
    train, val = prepared.train_tokens(), prepared.val_tokens()
    assert prepared.meta["dtype"] == "uint32" and train.dtype == val.dtype == np.uint32
    assert train.tolist() + val.tolist() == [100_097, 100_098, 100_099, 128_001, 100_100, 100_101]
    assert prepared.train_path.stat().st_size == 4 * len(train)
    again = prepare(str(tmp_path / "docs"), val_fraction=0.25, tokenizer=BigVocabTokenizer(), progress=False)
    assert again.dir == prepared.dir and again.meta["created"] == prepared.meta["created"]  # reused, complete


def test_prepare_folder_joins_documents_with_eot(tmp_path, tok, cache):
    texts = {"a.txt": "The first document.\n", "b.txt": "", "c.txt": "The second one, <|endoftext|> inside."}
    for name, text in texts.items():
        write(tmp_path / "docs" / name, text)
    prepared = prepare(str(tmp_path / "docs"), val_fraction=0.0, tokenizer=tok, progress=False)
    expected = tok.encode(texts["a.txt"]) + [EOT_TOKEN] + tok.encode(texts["c.txt"])
    assert prepared.train_tokens().tolist() == expected
    assert len(prepared.val_tokens()) == 0
    assert prepared.meta["n_docs"] == 2  # the empty file adds no extra separator


def test_prepare_reuses_tokens(tok, cache, verdict_path):
    counting = CountingTokenizer(tok)
    first = prepare("the-verdict", tokenizer=counting, progress=False)
    assert counting.calls > 0
    mtime = first.train_path.stat().st_mtime_ns

    counting.calls = 0
    second = prepare("the-verdict", tokenizer=counting, progress=False)
    assert counting.calls == 0  # not tokenized again
    assert second.dir == first.dir and second.meta == first.meta
    assert second.train_path.stat().st_mtime_ns == mtime

    third = prepare("the-verdict", tokenizer=counting, progress=False, force=True)
    assert counting.calls > 0 and third.dir == first.dir
    assert np.array_equal(third.train_tokens(), first.train_tokens())

    # A different split is a different folder; only finished folders are in the cache.
    other = prepare("the-verdict", val_fraction=0.2, tokenizer=tok, progress=False)
    assert other.dir != first.dir
    assert sorted(p.name for p in (cache / "tokens").iterdir()) == sorted([first.dir.name, other.dir.name])


def test_prepare_notices_edited_files(tmp_path, tok, cache):
    path = write(tmp_path / "story.txt", "Once upon a time.")
    first = prepare(str(path), val_fraction=0.0, tokenizer=tok, progress=False)
    write(path, "Once upon a time, again and again.")
    os.utime(path, ns=(time.time_ns(), first.train_path.stat().st_mtime_ns + 10**9))
    second = prepare(str(path), val_fraction=0.0, tokenizer=tok, progress=False)
    assert second.dir != first.dir
    assert second.train_tokens().tolist() == tok.encode("Once upon a time, again and again.")


def test_interrupted_prepare_leaves_nothing_reusable(tmp_path, tok, cache, monkeypatch):
    monkeypatch.setattr("llm.data.tokenfiles.PIECE_CHARS", 64)  # many pieces
    monkeypatch.setattr("llm.data.tokenfiles.PIECES_PER_BATCH", 1)  # one tokenizer call per piece
    path = write(tmp_path / "long.txt", "word " * 2000)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(path), tokenizer=CountingTokenizer(tok, fail_after=3), progress=False)
    assert list((cache / "tokens").iterdir()) == []  # neither a final nor a temporary folder

    prepared = prepare(str(path), tokenizer=tok, progress=False)
    full = prepared.train_tokens().tolist() + prepared.val_tokens().tolist()
    assert full == tok.encode("word " * 2000)


def test_damaged_cache_is_rebuilt(tok, cache, verdict_path):
    first = prepare("the-verdict", tokenizer=tok, progress=False)
    os.truncate(first.train_path, 100)
    second = prepare("the-verdict", tokenizer=tok, progress=False)
    assert len(second.train_tokens()) == first.meta["n_train_tokens"]
    assert Prepared.from_dir(second.dir).meta == second.meta


def test_prepare_rejects_bad_arguments(tok, cache):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare("the-verdict", val_fraction=1.0, tokenizer=tok)
    with pytest.raises(TypeError, match="hf_splt"):
        prepare("the-verdict", tokenizer=tok, hf_splt="train")


def test_split_for_tokenizer_is_exact(tok, verdict_path):
    """Pieces cut where we cut them tokenize exactly like the whole text."""
    tricky = (
        "Plain words.\n\nDouble newline, then  two spaces, \t tab,\r\nCRLF,   \n  indented.\n"
        "Special:\n\n<|endoftext|>\nafter it <|endoftext|>x. Unicode\u00a0nbsp\u3000ideographic "
        "space, \x1cfile separator, émigré 東京 🤖. Trailing spaces   \n"
    ) * 20
    for text in [tricky, verdict_path.read_text(encoding="utf-8")]:
        whole = tok.encode(text)
        for piece_chars in [1, 7, 64, 1000]:
            blocks = [text[i : i + 50] for i in range(0, len(text), 50)]
            pieces = list(split_for_tokenizer(blocks, piece_chars))
            assert "".join(pieces) == text and all(pieces)
            assert len(pieces) > 1
            assert [i for p in tok.encode_batch(pieces) for i in p] == whole, piece_chars


# --------------------------------------------------------------------------------------------
# Sliding windows (the book's dataset)


def test_sliding_window_dataset():
    tokens = np.arange(100, dtype=np.uint16)
    ds = SlidingWindowDataset(tokens, max_length=8, stride=4)
    assert len(ds) == len(range(0, 100 - 8, 4))
    for i in [0, 1, len(ds) - 1]:
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8,)
        assert x.tolist() == list(range(4 * i, 4 * i + 8))
        assert y.tolist() == list(range(4 * i + 1, 4 * i + 9))  # targets shifted by one
    x, y = next(iter(create_dataloader(tokens, batch_size=3, max_length=8, stride=8)))
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="block_size"):
        SlidingWindowDataset(tokens[:8], max_length=8, stride=1)


# --------------------------------------------------------------------------------------------
# TokenLoader


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(a, b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["random", "sliding"])
def test_loader_batches_are_windows(mode):
    tokens = np.arange(1000, dtype=np.uint16)
    loader = TokenLoader(tokens, batch_size=4, block_size=16, mode=mode)
    for x, y in batches(loader, 5):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(y, x + 1)  # tokens are 0..999, so a shifted window is x + 1
        assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows
        assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= 999


def test_random_starts_cover_the_whole_range():
    loader = TokenLoader(np.arange(20), batch_size=64, block_size=16, mode="random")
    starts = torch.cat([x[:, 0] for x, _ in batches(loader, 5)])
    assert set(starts.tolist()) == set(range(0, 20 - 16))  # [0, len - block_size - 1]


@pytest.mark.parametrize("mode", ["random", "sliding"])
def test_loader_is_deterministic_and_leaves_global_rng_alone(mode):
    tokens = np.arange(5000, dtype=np.uint16)
    torch.manual_seed(0)
    np.random.seed(0)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = batches(TokenLoader(tokens, 4, 32, mode=mode, seed=1), 6)
    b = batches(TokenLoader(tokens, 4, 32, mode=mode, seed=1), 6)
    c = batches(TokenLoader(tokens, 4, 32, mode=mode, seed=2), 6)
    assert same(a, b)
    assert not same(a, c)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_sliding_mode_visits_every_window_once_per_epoch():
    tokens = np.arange(1 + 16 * 12, dtype=np.uint16)  # exactly 12 windows of 16 with stride 16
    loader = TokenLoader(tokens, batch_size=4, block_size=16, mode="sliding")
    assert loader.n_windows == 12
    epoch0 = torch.cat([x[:, 0] for x, _ in batches(loader, 3)]).tolist()
    assert sorted(epoch0) == list(range(0, 16 * 12, 16))
    assert loader.epoch == 1 and loader.index == 0
    epoch1 = torch.cat([x[:, 0] for x, _ in batches(loader, 3)]).tolist()
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # reshuffled

    # 5 windows and batches of 2: the third batch takes one from each epoch.
    loader = TokenLoader(np.arange(81), batch_size=2, block_size=16, stride=16, mode="sliding")
    seen = torch.cat([x[:, 0] for x, _ in batches(loader, 5)]).tolist()
    assert sorted(seen[:5]) == sorted(seen[5:]) == [0, 16, 32, 48, 64]
    assert (loader.epoch, loader.index) == (2, 0)

    ordered = TokenLoader(np.arange(81), batch_size=5, block_size=16, mode="sliding", shuffle=False)
    assert ordered.next_batch()[0][:, 0].tolist() == [0, 16, 32, 48, 64]


@pytest.mark.parametrize("mode", ["random", "sliding"])
def test_loader_resumes_exactly_from_state_dict(mode, tmp_path):
    tokens = np.arange(400, dtype=np.uint16)  # 24 sliding windows of 16: epochs wrap below
    kwargs = dict(batch_size=5, block_size=16, mode=mode, seed=7)
    uninterrupted = TokenLoader(tokens, **kwargs)
    expected = batches(uninterrupted, 12)

    first = TokenLoader(tokens, **kwargs)
    batches(first, 7)
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")  # as the trainer does

    resumed = TokenLoader(tokens, **kwargs)  # a fresh process would build a fresh loader
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"])
    assert same(batches(resumed, 5), expected[7:])
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_load_state_dict_rejects_another_stream():
    loader = TokenLoader(np.arange(400), batch_size=2, block_size=16)
    with pytest.raises(ValueError, match="n_tokens"):
        TokenLoader(np.arange(500), batch_size=2, block_size=16).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="block_size"):
        TokenLoader(np.arange(400), batch_size=2, block_size=8).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("mode", ["random", "sliding"])
def test_ranks_split_the_global_batch(mode):
    tokens = np.arange(3000, dtype=np.uint16)
    single = TokenLoader(tokens, batch_size=6, block_size=8, mode=mode, seed=3)
    ranks = [TokenLoader(tokens, batch_size=3, block_size=8, mode=mode, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(40):  # sliding: 374 windows, so this crosses no epoch; fine either way
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_loader_rejects_short_streams_and_bad_ranks():
    with pytest.raises(ValueError, match="block_size \\+ 1"):
        TokenLoader(np.arange(16), batch_size=1, block_size=16)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(np.arange(100), batch_size=1, block_size=16, rank=2, world_size=2)


def test_loader_accepts_prepared_memmap(tok, cache, verdict_path):
    prepared = prepare("the-verdict", tokenizer=tok, progress=False)
    loader = TokenLoader(prepared.train_tokens(), batch_size=2, block_size=32)
    x, y = loader.next_batch()
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])


# --------------------------------------------------------------------------------------------
# Unigram yardstick


def test_unigram_loss_by_hand():
    # vocab {0, 1, 2}; train counts [2, 1, 0] + 1 -> [3, 2, 1] / 6
    loss = unigram_loss([0, 0, 1], [0, 2], vocab_size=3)
    assert loss == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
    with pytest.raises(ValueError):
        unigram_loss([0, 5], [0], vocab_size=3)


def test_load_state_dict_rejects_another_global_batch():
    # Batch k is cut from a global batch of batch_size * world_size windows: another size is
    # another stream, even with the same tokens.
    saved = TokenLoader(np.arange(400), batch_size=2, block_size=16, world_size=2).state_dict()
    with pytest.raises(ValueError, match="global_batch_size=4, but this loader has 2"):
        TokenLoader(np.arange(400), batch_size=2, block_size=16).load_state_dict(saved)
    TokenLoader(np.arange(400), batch_size=4, block_size=16).load_state_dict(saved)  # same global batch: fine
