"""Byte-level BPE trained from scratch (``llm tokenizer train``): the merges, the incremental trainer
against a plain recount, our pure-Python encoder against tiktoken (GPT-2's own ranks, the whole of
tinyshakespeare, hostile text), the tiktoken file format, ``get_tokenizer(folder)``, and the CLI
from training through ``llm prepare`` to the tokenizer-mismatch error."""
import json
import shutil

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llm import data
from llm.bpe import (
    CONFIG_FILE,
    GPT2_PATTERN,
    RANKS_FILE,
    BPETokenizer,
    PyBPE,
    count_words,
    fix_surrogates,
    save_bpe,
    train_bpe,
)
from llm.cli import main
from llm.data import fetch_corpus
from llm.tokenizer import get_tokenizer

HOSTILE = [
    "",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "emoji 😀🤖 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "mixed: 東京タワー 中文字符 العربية हिन्दी Ελληνικά мир naïve café",
    " " * 257 + "spaces" + " " * 33,
    "\n" * 40 + "\t\t\t \n \r\n\r\n\t x\t",
    "I'm it's we'll they've you're he'd DON'T 'tis o'er",
    "digits 1234567890 3.14159 1,000,000 ١٢٣٤ ४५६ ⅷ",
    "controls \x00\x01\x1c\x1d\x1e\x1f\x7f\x85\xa0\u2028\u3000 end",
    "combining e\u0301 and joiners a\u200db \ufeff",
    "<|endoftext|>text<|endoftext|><|endoftext|>",
    "lone surrogate \ud800 and \udfff and a pair \ud83d\ude00",
]
"""Texts that stress the pre-tokenizer and the byte fallback; the last is not valid Unicode."""


@pytest.fixture(scope="module")
def shakespeare():
    return fetch_corpus("tinyshakespeare").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory, shakespeare):
    """A 400-id tokenizer trained on tinyshakespeare's first 50,000 characters, with two specials."""
    specials = ["<|endoftext|>", "<|pad|>"]
    vocab, _ = train_bpe(count_words([shakespeare[:50_000]], specials), 400 - 256 - len(specials))
    folder = save_bpe(tmp_path_factory.mktemp("bpe") / "small", vocab, specials)
    return BPETokenizer(folder)


# ---------------------------------------------------------------------------------------------- training


def test_most_frequent_pair_is_merged_first():
    # Sennrich et al.'s example: "es" and "st" tie at 6 + 3 = 9 (the smaller pair of ids wins), then
    # "es"+"t" = 9, then "l"+"o" and "o"+"w" tie at 7, then "lo"+"w" = 7 beats every pair at 6.
    words = {b"low": 5, b"lower": 2, b"newest": 6, b"widest": 3}
    vocab, merges = train_bpe(words, 4)
    assert vocab[256:] == [b"es", b"est", b"lo", b"low"]
    assert merges == [(ord("e"), ord("s")), (256, ord("t")), (ord("l"), ord("o")), (258, ord("w"))]


def _train_by_recount(words: dict[bytes, int], n_merges: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The book's trainer: count every pair again before each merge (slow; same rules as train_bpe)."""
    vocab = [bytes([i]) for i in range(256)]
    seqs, counts = [list(w) for w in words], list(words.values())
    merges = []
    while len(merges) < n_merges:
        stats: dict = {}
        for ids, c in zip(seqs, counts):
            for pair in zip(ids, ids[1:]):
                stats[pair] = stats.get(pair, 0) + c
        a, b = min(stats, key=lambda p: (-stats[p], p))
        merged = vocab[a] + vocab[b]
        if merged in vocab:
            new = vocab.index(merged)
        else:
            new = len(vocab)
            vocab.append(merged)
            merges.append((a, b))
        for k, ids in enumerate(seqs):
            out, i = [], 0
            while i < len(ids):
                if ids[i:i + 2] == [a, b]:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            seqs[k] = out
    return vocab, merges


def test_incremental_counts_equal_a_full_recount(shakespeare):
    words = count_words([shakespeare[:20_000]])
    assert train_bpe(words, 150) == _train_by_recount(words, 150)


def test_trained_vocabulary_properties(small_tok, shakespeare):
    assert small_tok.n_vocab == small_tok.vocab_size == 400
    ranks = small_tok._enc._mergeable_ranks
    by_id = sorted(ranks, key=ranks.get)
    assert sorted(ranks.values()) == list(range(398)) and len(set(by_id)) == 398
    assert by_id[:256] == [bytes([i]) for i in range(256)]
    # Ordered by first-merged: each token splits into two tokens that existed before it.
    for rank in range(256, 398):
        tok = by_id[rank]
        assert any(ranks.get(tok[:k], rank) < rank and ranks.get(tok[k:], rank) < rank for k in range(1, len(tok)))
    # The first merge is the most frequent adjacent byte pair of the training words.
    words = count_words([shakespeare[:50_000]])
    stats: dict = {}
    for w, c in words.items():
        for pair in zip(w, w[1:]):
            stats[pair] = stats.get(pair, 0) + c
    assert by_id[256] == bytes(min(stats, key=lambda p: (-stats[p], p)))


def test_specials_take_the_last_ids_and_are_not_learned(small_tok):
    assert small_tok.encode("<|endoftext|>") == [398] and small_tok.encode("<|pad|>") == [399]
    assert small_tok.eot_token == small_tok.eos_token_id == 398
    assert small_tok.encode("a<|pad|>b") == [*small_tok.encode("a"), 399, *small_tok.encode("b")]
    assert 398 not in small_tok.encode("<|endoftext|>", allow_special=False)
    assert not any(b"endoftext" in w or b"<|" in w for w in count_words(["x<|endoftext|>y " * 50], ["<|endoftext|>"]))


@pytest.mark.parametrize("text", HOSTILE)
def test_round_trip_and_python_encoder_matches_tiktoken(small_tok, text):
    ids = small_tok.encode(text)
    assert all(0 <= i < small_tok.n_vocab for i in ids)
    assert small_tok.decode(ids) == fix_surrogates(text)
    assert small_tok.decode(np.array(ids, dtype=np.uint16)) == fix_surrogates(text)
    py = small_tok.py_encoder()
    assert py.encode(text) == ids and py.decode(ids) == fix_surrogates(text)
    assert py.encode(text, allow_special=False) == small_tok.encode(text, allow_special=False)


def test_lone_surrogates_follow_tiktoken():
    assert fix_surrogates("a\ud800b") == "a\ufffdb"
    assert fix_surrogates("\ud83d\ude00") == "😀"  # a surrogate pair becomes its character, as tiktoken does
    assert fix_surrogates("plain") == "plain"


# ---------------------------------------------------------------------------------------------- exactness


def test_python_encoder_equals_tiktoken_gpt2_on_all_of_tinyshakespeare(gpt2, shakespeare):
    assert gpt2._pat_str == GPT2_PATTERN
    py = PyBPE(gpt2._mergeable_ranks, gpt2._special_tokens)
    ids = py.encode(shakespeare)
    assert ids == gpt2.encode(shakespeare, allowed_special="all")
    assert len(ids) == 338_025  # GPT-2's well-known token count of tinyshakespeare
    assert py.decode(ids) == shakespeare


@pytest.mark.parametrize("text", HOSTILE)
def test_python_encoder_equals_tiktoken_gpt2_on_hostile_text(gpt2, text):
    py = PyBPE(gpt2._mergeable_ranks, gpt2._special_tokens)
    assert py.encode(text) == gpt2.encode(text, allowed_special="all")
    assert py.encode(text, allow_special=False) == gpt2.encode_ordinary(text)
    assert py.decode(py.encode(text)) == gpt2.decode(gpt2.encode(text, allowed_special="all"))


# ---------------------------------------------------------------------------------------------- files


def test_ranks_file_is_tiktokens_format(small_tok, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, and cache nothing
    assert load_tiktoken_bpe(str(small_tok.path / RANKS_FILE)) == small_tok._enc._mergeable_ranks
    config = json.loads((small_tok.path / CONFIG_FILE).read_text())
    assert config["vocab_size"] == 400 and config["pattern"] == GPT2_PATTERN
    assert config["special_tokens"] == {"<|endoftext|>": 398, "<|pad|>": 399}


def test_get_tokenizer_loads_the_folder(small_tok, tmp_path):
    tok = get_tokenizer(small_tok.path)
    assert isinstance(tok, BPETokenizer) and tok.name == str(small_tok.path.resolve())
    assert get_tokenizer(str(small_tok.path)) is tok is get_tokenizer(small_tok.path / RANKS_FILE)
    text = HOSTILE[2] + HOSTILE[3]
    assert tok.encode(text) == small_tok.encode(text) and tok.encode_batch([text, "x"]) == [tok.encode(text), [120]]
    # The identity is the content, not the path: a copy elsewhere is the same tokenizer.
    copy = shutil.copytree(small_tok.path, tmp_path / "copy")
    assert get_tokenizer(copy).sha256 == tok.sha256 and get_tokenizer(copy).name != tok.name


def test_edited_or_incomplete_folder_is_an_error(small_tok, tmp_path):
    folder = shutil.copytree(small_tok.path, tmp_path / "edited")
    with open(folder / RANKS_FILE, "ab") as f:
        f.write(b"eHl6 398\n")
    with pytest.raises(ValueError, match="ranks_sha256"):
        get_tokenizer(folder)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        get_tokenizer(folder)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def corpus_file(tmp_path, shakespeare):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare[:30_000], encoding="utf-8")
    return path


def test_cli_train_then_prepare_records_the_tokenizer(corpus_file, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "300", "--out", str(out),
                 "--no-progress"]) == 0
    assert "trained 300 tokens" in capsys.readouterr().out
    tok = get_tokenizer(out)
    assert tok.n_vocab == 300 and tok.eot_token == 299
    assert main(["prepare", str(corpus_file), "--tokenizer", str(out), "--val-fraction", "0.1", "--no-progress"]) == 0
    prepared = data.prepare(str(corpus_file), tokenizer=tok, progress=False)
    assert prepared.meta["tokenizer"] == str(out.resolve()) and prepared.meta["tokenizer_sha256"] == tok.sha256
    assert prepared.meta["n_vocab"] == 300
    ids = np.concatenate([prepared.train_tokens(), prepared.val_tokens()])
    assert tok.decode(ids) == corpus_file.read_text(encoding="utf-8")

    # Retrained in place: same path, other ids; the old token files must not pass for the new tokenizer's.
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "320", "--out", str(out),
                 "--overwrite", "--no-progress"]) == 0
    retrained = get_tokenizer(out)
    assert retrained.sha256 != tok.sha256 and retrained.name == tok.name
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        data.prepare(str(prepared.dir), tokenizer=retrained, progress=False)
    capsys.readouterr()
    assert main(["prepare", str(prepared.dir), "--tokenizer", str(out), "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--vocab-size", "256"], "too small"),
    (["--vocab-size", "258", "--special", "<|a|>", "--special", "<|b|>", "--special", "<|c|>"], "too small"),
    (["--vocab-size", "100000"], "distinct merges"),
    (["--vocab-size", "300", "--data", "no/such/file.txt"], "no such file"),
])
def test_cli_bad_input_is_one_error_line(corpus_file, tmp_path, capsys, args, message):
    base = ["tokenizer", "train", "--data", str(corpus_file), "--out", str(tmp_path / "tok"), "--no-progress"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1


def test_cli_out_folder_that_exists_needs_overwrite(corpus_file, tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "260", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and not (out / RANKS_FILE).exists()
    assert main([*argv, "--overwrite"]) == 0 and get_tokenizer(out).n_vocab == 260
    assert (out / "notes.txt").read_text() == "mine"
