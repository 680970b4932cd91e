"""GPT-2 tokenizer: known ids, round trips, the special token, and the offline error."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from llm import tokenizer as tokenizer_module
from llm.tokenizer import EOT_TOKEN, get_tokenizer


@pytest.fixture(scope="module")
def tok():
    # No skip when the vocabulary is missing: a test run without it is broken, not green (its error
    # names TIKTOKEN_CACHE_DIR).  Online, tiktoken downloads it.
    return get_tokenizer()


def test_known_ids(tok):
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode(" the") == [262]
    assert tok.decode([15496, 11, 995]) == "Hello, world"


def test_vocabulary_facts(tok):
    assert tok.name == "gpt2"
    assert tok.n_vocab == 50257
    assert tok.eot_token == EOT_TOKEN == 50256
    assert tok.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace.",
        "  leading and trailing spaces  ",
        "tabs\tand\nnew\n\nlines\r\nand CRLF\r\n",
        "unicode: naïve café — 東京 🤖 Ελληνικά",
        "numbers 3.14159 and 1,000,000 and symbols #@!$%^&*()",
        "Akwirw ier",  # the book's example of unknown words split into sub-word tokens
        "<|endoftext|><|endoftext|>",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


def test_special_token(tok):
    assert tok.encode("a<|endoftext|>b") == [64, EOT_TOKEN, 65]
    plain = tok.encode("a<|endoftext|>b", allow_special=False)
    assert EOT_TOKEN not in plain
    assert tok.decode(plain) == "a<|endoftext|>b"


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("Every effort moves you")
    assert tok.decode(torch.tensor(ids)) == "Every effort moves you"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "Every effort moves you"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids, ids]))


def test_encode_batch_matches_encode(tok):
    texts = ["first text", "second <|endoftext|> text", "", "ünïcödé"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_get_tokenizer_is_cached(tok):
    assert get_tokenizer() is tok


def test_offline_without_cache_raises_clear_error(tmp_path):
    """With an empty vocabulary cache and no network, the error says what to do, quickly."""
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path))
    code = "from llm.tokenizer import get_tokenizer; get_tokenizer()"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - start
    if proc.returncode == 0:
        pytest.skip("this machine can download the GPT-2 vocabulary, so the offline path is not hit")
    assert "RuntimeError" in proc.stderr
    assert "GPT-2 vocabulary" in proc.stderr
    assert "could not be downloaded" in proc.stderr
    assert "TIKTOKEN_CACHE_DIR" in proc.stderr
    assert "vocab.bpe" in proc.stderr and "encoder.json" in proc.stderr
    assert elapsed < 90  # DOWNLOAD_TIMEOUT_S bounds it even when the network hangs


def test_hanging_download_times_out(tmp_path, monkeypatch):
    """tiktoken's own download has no timeout; we stop waiting for it."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    release = threading.Event()

    def hang(name):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", hang)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="(?s)timed out.*TIKTOKEN_CACHE_DIR"):
            tokenizer_module._load_encoding("gpt2", timeout=0.2)
    finally:
        release.set()  # let the helper thread finish
    assert time.monotonic() - start < 5
