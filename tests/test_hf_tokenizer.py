"""Tokenizers from a Hugging Face tokenizer.json: the wrapper, its errors, and --tokenizer from
``llm prepare`` through ``llm pretrain`` to ``llm generate`` / ``llm eval``.

The tokenizer is a 300-id byte-level BPE trained on the fly (``conftest.train_tiny_tokenizer``), so a
model over it is tiny and every run here takes seconds.
"""
import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import LLAMA3_PATTERN, train_tiny_tokenizer

from llm import data
from llm.train.checkpoint import load_checkpoint
from llm.cli import main
from llm.data import fetch_corpus
from llm.data.tokenfiles import _CUT, _NEWLINE_CUT, split_for_tokenizer
from llm.generate import generate_text
from llm.hf_tokenizer import HFTokenizer
from llm.model import GPT, GPTConfig
from llm.tokenizer import check_vocab_fits, get_tokenizer
from llm.train.pretrain import TrainConfig, check_resume_config, train

TEXTS = [
    "",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\nand CRLF\r\n",
    "unicode: naïve café — 東京 🤖 Ελληνικά",
    "numbers 3.14159 and 1,000,000",
    "a<|endoftext|>b<|endoftext|>",
]


@pytest.fixture(scope="module")
def tok(hf_tokenizer_dir):
    return get_tokenizer(hf_tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of tinyshakespeare's first 20,000 characters (about 8k ids of the tiny tokenizer)."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(fetch_corpus("tinyshakespeare").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text == tok.decode(torch.tensor(ids, dtype=torch.long))


def test_vocabulary_special_token_and_batch(tok, hf_tokenizer_dir):
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == tok.n_vocab == 300
    assert tok.name == str((hf_tokenizer_dir / "tokenizer.json").resolve())
    assert tok.eot_token == tok.eos_token_id == 0  # the trainer gives the special tokens the first ids
    assert tok.decode([0]) == "<|endoftext|>"
    a, b = tok.encode("a"), tok.encode("b")
    assert tok.encode("a<|endoftext|>b") == a + [0] + b
    plain = tok.encode("a<|endoftext|>b", allow_special=False)  # text from users: no control token in it
    assert 0 not in plain and tok.decode(plain) == "a<|endoftext|>b"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, allow_special=False) == [tok.encode(t, allow_special=False) for t in TEXTS]
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))


def test_get_tokenizer_takes_the_file_or_its_folder(hf_tokenizer_dir, tmp_path):
    by_file = get_tokenizer(str(hf_tokenizer_dir / "tokenizer.json"))
    assert get_tokenizer(hf_tokenizer_dir) is by_file  # one object per file, shared
    # an edited file is a different tokenizer: loaded again, with another sha256
    folder = tmp_path / "edited"
    train_tiny_tokenizer(folder)
    first = get_tokenizer(folder)
    train_tiny_tokenizer(folder, vocab_size=280)
    second = get_tokenizer(folder)
    assert second is not first and second.n_vocab == 280 and second.sha256 != first.sha256
    assert first.sha256 == by_file.sha256  # the same bytes: the same identity, wherever the file is


def test_eos_comes_from_tokenizer_config_or_a_known_special_token(tmp_path):
    folder = tmp_path / "chat"
    train_tiny_tokenizer(folder, special_tokens=("<unk>", "<|im_end|>", "<|end_of_text|>"))
    assert HFTokenizer(folder).eot_token == 2  # no tokenizer_config.json: the known end-of-text spelling
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert HFTokenizer(folder).eot_token == 1
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>", "special": True}}))
    assert HFTokenizer(folder).eot_token == 0  # the older AddedToken form
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' is not a token"):
        HFTokenizer(folder)


def test_a_tokenizer_without_eos_fails_only_where_one_is_needed(tmp_path):
    folder = tmp_path / "no-eos"
    train_tiny_tokenizer(folder, special_tokens=("<pad>",))
    tok = get_tokenizer(folder)
    assert tok.eos_token_id is None
    assert tok.decode(tok.encode("hello there")) == "hello there"
    with pytest.raises(ValueError, match="has no end-of-text token.*tokenizer_config.json"):
        tok.eot_token
    # generation needs no eos: it runs to max_new_tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    assert isinstance(generate_text(model, tok, "hello", 3, temperature=0.0)[0], str)
    # one document needs no separator; two do
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("First Citizen:\nBefore we proceed any further.\n" * 5)
    assert data.prepare(str(tmp_path / "docs"), tokenizer=tok, progress=False).meta["eot_token"] is None
    (tmp_path / "docs" / "b.txt").write_text("Second Citizen:\nSpeak, speak.\n" * 5)
    with pytest.raises(ValueError, match="has no end-of-text token"):
        data.prepare(str(tmp_path / "docs"), tokenizer=tok, progress=False)


def test_missing_paths_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer '{missing}': no such file or folder")):
        get_tokenizer(missing)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json.*it has vocab.json"):
        get_tokenizer(tmp_path / "slow")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        get_tokenizer(tmp_path / "bad.json")
    for argv in (["prepare", "the-verdict", "--tokenizer", str(missing), "--no-progress"],
                 ["pretrain", "--tokenizer", str(missing), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: tokenizer '{missing}'") and "Traceback" not in err


def test_a_missing_tokenizers_package_says_what_to_install(hf_tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(hf_tokenizer_dir)


@pytest.mark.parametrize("pattern", [None, LLAMA3_PATTERN], ids=["gpt2-regex", "llama3-regex"])
def test_corpus_pieces_tokenize_like_the_whole(tmp_path, pattern):
    """prepare() hands a tokenizer.json's text over in pieces cut after newlines: exactly the whole's ids."""
    text = ("First Citizen: \nBefore we proceed,  \n\nhear me 123 speak.\n"
            "All:\n Speak, speak!\t\nx <|endoftext|>\n<tag> 4567\n") * 30
    tok = HFTokenizer(train_tiny_tokenizer(tmp_path, pattern=pattern, extra_text=[text] * 5))  # merges " \n"
    whole = tok.encode(text)
    for piece_chars in (7, 31, 100, 257):
        pieces = list(split_for_tokenizer([text[i:i + 50] for i in range(0, len(text), 50)], piece_chars,
                                          _NEWLINE_CUT))
        assert "".join(pieces) == text and len(pieces) > 3
        assert [i for p in pieces for i in tok.encode(p)] == whole, piece_chars
    if pattern is not None:  # why not GPT-2's cut: it may fall inside " \n", which Llama 3 makes one token
        assert _CUT.search(": \nBefore").start() == 2 and _NEWLINE_CUT.search(": \nBefore").start() == 3
        assert tok.encode(": ") + tok.encode("\nBefore") != tok.encode(": \nBefore")


def test_prepare_pretrain_generate_and_eval_with_a_tokenizer_json(hf_tokenizer_dir, corpus, tmp_path, capsys):
    tok = get_tokenizer(hf_tokenizer_dir)
    assert main(["prepare", str(corpus), "--tokenizer", str(hf_tokenizer_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    folder = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("  dir: "))
    prepared = data.Prepared.from_dir(folder)
    assert prepared.meta["tokenizer"] == tok.name and prepared.meta["tokenizer_sha256"] == tok.sha256
    assert prepared.meta["n_vocab"] == 300 and prepared.meta["dtype"] == "uint16"
    tokens = np.concatenate([prepared.train_tokens(), prepared.val_tokens()])
    assert tokens.max() < 300 and tok.decode(tokens) == corpus.read_text(encoding="utf-8")

    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", folder, "--tokenizer", str(hf_tokenizer_dir),
                 "--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1",
                 "--eval-iters", "1", "--sample-tokens", "4", "--device", "cpu", "--no-progress",
                 "--out-dir", str(run)]) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["model_config"]["vocab_size"] == 300  # from scratch: the tokenizer's vocabulary
    assert ckpt["tokenizer"] == tok.name and ckpt["train_config"]["tokenizer"] == str(hf_tokenizer_dir)
    assert ckpt["data_meta"]["tokenizer_sha256"] == tok.sha256

    # generate and eval read the tokenizer from the checkpoint (GPT-2's 50257 ids would not fit the model)
    assert main(["generate", "--checkpoint", str(run / "ckpt.pt"), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["generate", "--checkpoint", str(run / "ckpt.pt"), "--tokenizer", "gpt2"]) == 2
    assert "vocab_size 300, fewer than the 50257 ids of tokenizer gpt2" in capsys.readouterr().err
    results = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", folder, "--split", "val", "--checkpoint", str(run / "ckpt.pt"),
                 "--out", str(results), "--no-progress"]) == 0
    result = json.loads(results.read_text())
    assert result["model"]["tokenizer"] == tok.name and result["metrics"]["tokens"] > 1000


def test_token_files_of_another_tokenizer_are_refused(hf_tokenizer_dir, corpus, tmp_path):
    tok = get_tokenizer(hf_tokenizer_dir)
    hf_folder = str(data.prepare(str(corpus), tokenizer=tok, progress=False).dir)
    gpt2_folder = str(data.prepare(str(corpus), progress=False).dir)
    base = dict(preset="tiny", block_size=32, batch_size=2, max_steps=1, eval_iters=1, sample_tokens=0,
                device="cpu", progress=False)
    with pytest.raises(ValueError, match=f"token folder {re.escape(hf_folder)} was made by tokenizer "
                                         f"'{re.escape(tok.name)}' \\(300 ids\\), not by 'gpt2'"):
        train(TrainConfig(**base, data=hf_folder, out_dir=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="made by tokenizer 'gpt2' \\(50257 ids\\)"):
        train(TrainConfig(**base, data=gpt2_folder, tokenizer=str(hf_tokenizer_dir), out_dir=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="split with val_fraction=0.1, not 0.2: pass --val-fraction 0.1"):
        train(TrainConfig(**base, data=hf_folder, tokenizer=str(hf_tokenizer_dir), val_fraction=0.2,
                          out_dir=str(tmp_path / "c")))
    # a tokenizer.json edited in place keeps its name but not its ids
    moved = tmp_path / "tok"
    train_tiny_tokenizer(moved)
    folder = str(data.prepare(str(corpus), tokenizer=get_tokenizer(moved), progress=False).dir)
    train_tiny_tokenizer(moved, vocab_size=290)
    with pytest.raises(ValueError, match="tokenizer_sha256 .* there, .* now"):
        data.prepare(folder, tokenizer=get_tokenizer(moved))
    assert not any((tmp_path / d / "ckpt.pt").exists() for d in "abc")  # refused before training


def test_a_model_smaller_than_the_vocabulary_is_refused(hf_tokenizer_dir, tmp_path):
    GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "hf")
    cfg = TrainConfig(init_from=str(tmp_path / "hf"), data="the-verdict", block_size=32, batch_size=2, max_steps=1,
                      device="cpu", progress=False, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="vocab_size 300, fewer than the 50257 ids of tokenizer gpt2"):
        train(cfg)
    tok = get_tokenizer(hf_tokenizer_dir)
    check_vocab_fits(300, tok)
    with pytest.raises(ValueError, match="vocab_size 299"):
        check_vocab_fits(299, tok)


def test_a_resumed_run_keeps_its_tokenizer(hf_tokenizer_dir):
    cfg = TrainConfig(tokenizer=str(hf_tokenizer_dir))
    with pytest.raises(ValueError, match="--tokenizer cannot change when resuming"):
        check_resume_config(dataclasses.asdict(cfg), dataclasses.replace(cfg, tokenizer="gpt2"))


def test_a_hugging_face_model_folder_brings_its_own_tokenizer(hf_tokenizer_dir, corpus, tmp_path, capsys):
    from llm.finetune.common import load_tokenizer
    from llm.finetune.sft import SFTConfig

    folder = tmp_path / "model"
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(folder)
    argv = ["generate", "--hf-dir", str(folder), "--prompt", "ROMEO:", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(argv) == 2  # weights alone: GPT-2's tokenizer, whose ids do not fit
    assert "fewer than the 50257 ids of tokenizer gpt2" in capsys.readouterr().err
    (folder / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    assert main(argv) == 0 and capsys.readouterr().out.startswith("ROMEO:")
    tok = load_tokenizer(SFTConfig(hf_model=str(folder)), {"hf_model": str(folder)}, model)
    assert tok.name == str((folder / "tokenizer.json").resolve())
    summary = train(TrainConfig(init_from=str(folder), data=str(corpus), block_size=32, batch_size=2, max_steps=1,
                                eval_iters=1, sample_tokens=0, device="cpu", progress=False,
                                out_dir=str(tmp_path / "run")))
    assert load_checkpoint(summary["checkpoint"])["tokenizer"] == tok.name
