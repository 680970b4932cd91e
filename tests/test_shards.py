"""Token shards (llm/data/shards.py): streamed, parallel, resumable tokenization of jsonl/parquet/text
files into llm.c-style shards, and the loader that reads them with an exact resume position."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from llm.data import shards as S
from llm.tokenizer import get_tokenizer


def _documents(n=60, seed=0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "Émile", "naïve", "日本語", "🙂", "\n", "  ", "ROMEO:", "<|endoftext|>"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 80))) for _ in range(n)]
    docs[7] = ""  # an empty document: no tokens, no separator
    docs[11] = "a long line of words " * 14000  # > PIECE_CHARS: tokenized in safe pieces
    return docs


def _expected(tok, docs) -> np.ndarray:
    """The stream prepare writes: each non-empty document, <|endoftext|> between them."""
    out: list[int] = []
    for i, text in enumerate(docs):
        ids = tok.encode(text)
        if ids:
            out += ([tok.eot_token] if i > 0 else []) + ids
    return np.asarray(out)


def _write_sources(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = len(docs) // 2
    (tmp_path / "src").mkdir()
    with open(tmp_path / "src" / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:half]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": docs[half:]}), tmp_path / "src" / "b.parquet", row_group_size=7)
    return str(tmp_path / "src")


def _stream(shard_set) -> np.ndarray:
    return np.concatenate([np.asarray(S.open_shard(p)) for p in shard_set.val_paths + shard_set.train_paths])


@pytest.mark.parametrize("num_proc", [1, 2])
def test_shards_hold_exactly_the_token_stream(tmp_path, num_proc):
    tok, docs = get_tokenizer("gpt2"), _documents()
    src = _write_sources(tmp_path, docs)
    result = S.prepare_shards(src, tmp_path / "out", tok, shard_tokens=4000, val_shards=1, num_proc=num_proc,
                              progress=False)
    want = _expected(tok, docs)
    np.testing.assert_array_equal(_stream(result), want)
    assert [p.name for p in result.val_paths] == ["val_000000.bin"] and result.train_paths[0].name == "train_000001.bin"
    sizes = [s["tokens"] for s in result.meta["shards"]]
    assert all(n == 4000 for n in sizes[:-1]) and 0 < sizes[-1] <= 4000 and sum(sizes) == len(want)
    h = S.read_header(result.train_paths[0])
    raw = np.fromfile(result.train_paths[0], dtype=np.int32, count=3)
    assert list(raw) == [20240520, 1, 4000]  # llm.c's header: its loader reads these shards
    assert h["dtype"] == np.uint16 and h["n_vocab"] == 50257 and h["eot"] == 50256
    assert h["tokenizer_id"] == result.meta["tokenizer_id"][:32]


def test_an_interrupted_prepare_continues_at_the_exact_next_token(tmp_path, monkeypatch):
    tok, docs = get_tokenizer("gpt2"), _documents(seed=1)
    src = _write_sources(tmp_path, docs)
    full = S.prepare_shards(src, tmp_path / "full", tok, shard_tokens=1500, progress=False)
    write = S.write_shard
    count = {"n": 0}

    def dies_at_the_fifth(path, tokens, **kw):
        count["n"] += 1
        if count["n"] == 5:
            path.write_bytes(b"half a shard")  # what a kill mid-write could leave (not in the manifest)
            raise KeyboardInterrupt
        write(path, tokens, **kw)

    monkeypatch.setattr(S, "write_shard", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        S.prepare_shards(src, tmp_path / "cut", tok, shard_tokens=1500, progress=False)
    monkeypatch.setattr(S, "write_shard", write)
    meta = json.loads((tmp_path / "cut" / S.MANIFEST).read_text())
    assert len(meta["shards"]) == 4 and not meta["complete"]
    assert meta["next_offset"] > 0  # the 5th shard starts inside a document
    with pytest.raises(ValueError, match="not finished"):
        S.load_shards(tmp_path / "cut")
    with pytest.raises(ValueError, match="shard_tokens=1500"):
        S.prepare_shards(src, tmp_path / "cut", tok, shard_tokens=1000, progress=False)
    resumed = S.prepare_shards(src, tmp_path / "cut", tok, shard_tokens=1500, progress=False)
    assert [s["name"] for s in resumed.meta["shards"]] == [s["name"] for s in full.meta["shards"]]
    for a, b in zip(full.val_paths + full.train_paths, resumed.val_paths + resumed.train_paths):
        assert a.read_bytes() == b.read_bytes(), b.name
    again = S.prepare_shards(src, tmp_path / "cut", tok, shard_tokens=1500, progress=False)  # finished: reused
    assert again.meta == resumed.meta


def test_max_tokens_takes_a_sample_and_another_tokenizer_is_refused(tmp_path):
    tok, docs = get_tokenizer("gpt2"), _documents(seed=2)
    src = _write_sources(tmp_path, docs)
    sample = S.prepare_shards(src, tmp_path / "s", tok, shard_tokens=1000, max_tokens=2500, progress=False)
    assert [s["tokens"] for s in sample.meta["shards"]] == [1000, 1000, 500]
    np.testing.assert_array_equal(_stream(sample), _expected(tok, docs)[:2500])

    class Other:  # a tokenizer.json-like identity
        name, n_vocab, eot_token, sha256, eos_token_id = "other.json", 50257, 50256, "ab" * 32, 50256

    with pytest.raises(ValueError, match="was made by tokenizer"):
        S.load_shards(tmp_path / "s", Other())
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no field 'text'"):
        S.prepare_shards(str(tmp_path / "bad.jsonl"), tmp_path / "b", tok, progress=False)


def test_headers_are_checked(tmp_path):
    path = tmp_path / "x.bin"
    S.write_shard(path, np.arange(10, dtype=np.uint32), n_vocab=151_669, eot=3, tokenizer_id="cd" * 32)
    assert list(np.fromfile(path, dtype=np.int32, count=3)) == [20240801, 7, 10]  # llm.c's uint32 header
    np.testing.assert_array_equal(S.open_shard(path), np.arange(10))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        S.read_header(path)
    path.write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match="not a token shard"):
        S.read_header(path)


def _shard_files(tmp_path, sizes):
    paths, start = [], 0
    for i, n in enumerate(sizes):
        p = tmp_path / f"train_{i:06d}.bin"
        S.write_shard(p, np.arange(start, start + n, dtype=np.uint32) % 60000, n_vocab=60000, eot=0,
                      tokenizer_id="00" * 32)
        paths.append(p)
        start += n
    return paths


def test_loader_ranks_read_disjoint_slices_and_resume_on_the_next_token(tmp_path):
    paths = _shard_files(tmp_path, [1000, 700, 1300])
    B, T = 2, 16
    one = S.ShardLoader(paths, 2 * B, T)  # one process with the global batch
    ranks = [S.ShardLoader(paths, B, T, rank=r, world_size=2) for r in range(2)]
    for _ in range(60):  # more than one pass over the three shards (their tails are skipped)
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert one.epoch >= 1

    a = S.ShardLoader(paths, B, T)
    for _ in range(13):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint keeps
    want = [a.next_batch() for _ in range(30)]  # across shard boundaries
    b = S.ShardLoader(paths, B, T)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(30)]
    assert all(torch.equal(w[0], g[0]) and torch.equal(w[1], g[1]) for w, g in zip(want, got))
    with pytest.raises(ValueError, match="global batch"):
        S.ShardLoader(paths, B + 1, T).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        S.ShardLoader(paths, 64, 64)


def test_pretraining_on_shards_resumes_on_the_exact_next_token(tmp_path):
    from llm.data.corpora import fetch_corpus
    from llm.train.checkpoint import load_checkpoint
    from llm.train.pretrain import TrainConfig, train

    text = open(fetch_corpus("the-verdict"), encoding="utf-8").read()
    with open(tmp_path / "verdict.jsonl", "w", encoding="utf-8") as f:
        for para in text.split("\n\n"):
            f.write(json.dumps({"text": para}) + "\n")
    S.prepare_shards(str(tmp_path / "verdict.jsonl"), tmp_path / "shards", get_tokenizer("gpt2"), shard_tokens=1200,
                     progress=False)
    run = dict(preset="tiny", data=str(tmp_path / "shards"), block_size=32, batch_size=4, max_steps=12, lr=3e-3,
               checkpoint_interval=5, eval_interval=6, eval_iters=2, sample_tokens=0, device="cpu", progress=False)
    full = train(TrainConfig(**run, out_dir=str(tmp_path / "full")))  # 12 x 128 tokens: past the first shard

    class Crash(Exception):
        pass

    def crash_at_7(step, record):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(TrainConfig(**run, out_dir=str(tmp_path / "cut")), on_step=crash_at_7)
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["loader"]["shard"] == 0
    resumed = train(TrainConfig(**run, out_dir=str(tmp_path / "cut"), resume=True))
    assert resumed["losses"] == full["losses"][5:]  # steps 6..12, bitwise, across the shard boundary
    ckpt = load_checkpoint(tmp_path / "full" / "ckpt.pt")
    assert ckpt["loader_mode"] == "shards" and ckpt["loader"]["shard"] == 1
    with pytest.raises(ValueError, match="shard folder, read in order"):
        train(TrainConfig(**run, loader="random", out_dir=str(tmp_path / "other")))


def test_the_prepare_command_writes_shards(tmp_path, capsys):
    from llm.cli import main

    docs = _documents(seed=3)
    src = _write_sources(tmp_path, docs)
    argv = ["prepare", src, "--shards", str(tmp_path / "out"), "--shard-tokens", "3000", "--num-proc", "1",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    n = len(_expected(get_tokenizer("gpt2"), docs))
    assert f"{n:,} tokens" in out and f"in {-(-n // 3000)} shards" in out
    assert main(argv[:-1] + ["--shard-tokens", "2000", "--no-progress"]) == 2  # another shard size: refused
    assert "shard_tokens=3000" in capsys.readouterr().err


def test_a_hugging_face_dataset_is_streamed(tmp_path):
    """hf:<builder> in streaming mode (here datasets' own json builder on a local file: no download)."""
    pytest.importorskip("datasets")
    tok, docs = get_tokenizer("gpt2"), _documents(seed=4)[:30]
    with open(tmp_path / "d.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    result = S.prepare_shards("hf:json", tmp_path / "out", tok, shard_tokens=2000, progress=False,
                              hf_data_files=str(tmp_path / "d.jsonl"))
    np.testing.assert_array_equal(_stream(result), _expected(tok, docs))
