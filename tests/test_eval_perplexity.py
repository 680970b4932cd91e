"""llm.eval.perplexity: the model's own loss in one window; sliding windows against a per-token oracle."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm.eval.perplexity import load_tokens, perplexity, window_plan
from llm.model import GPT, GPTConfig

V = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


class PeriodicModel(torch.nn.Module):
    """Knows that the text repeats with period P: position t predicts token t + 1 = token t + 1 - P,
    when that token is inside its window, else it has no idea (uniform).  A random GPT barely
    uses its context; this one depends on it entirely, in a way whose effect is known."""

    P = 5

    def __init__(self):
        super().__init__()
        self.config = GPTConfig(vocab_size=V, block_size=64, n_layer=1, n_head=1, n_embd=8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the evaluator a device to read

    def forward(self, idx, targets=None, ignore_index=-100):
        B, T = idx.shape
        logits = torch.zeros(B, T, V)
        lag = self.P - 1
        if T > lag:
            logits[:, lag:].scatter_(-1, idx[:, : T - lag, None], 5.0)  # (B, T - lag, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=ignore_index)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, V, size=60).astype(np.uint16)


def test_one_window_is_exp_of_the_models_mean_loss(model, tokens):
    ids = torch.from_numpy(tokens[:41].astype(np.int64))[None]  # (1, 41): 40 targets, fits in the block of 64
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    got = perplexity(model, tokens[:41], progress=False)
    assert got["tokens"] == 40
    assert got["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def _oracle(model, tokens, block, stride):
    """Mean -log p(t_i | its window's context), one forward per target token."""
    n = len(tokens)
    ids = torch.from_numpy(tokens.astype(np.int64))
    nll = []
    for t in range(1, n):
        j = 0  # the first window (starting at j * stride) whose last target reaches t scores t
        while min(j * stride + block, n - 1) < t:
            j += 1
        begin = j * stride
        with torch.no_grad():
            logits, _ = model(ids[None, begin:t])  # (1, t - begin, V)
        nll.append(-F.log_softmax(logits[0, -1].double(), dim=-1)[ids[t]].item())
    return sum(nll) / len(nll)


@pytest.mark.parametrize("kind", ["gpt", "periodic"])
@pytest.mark.parametrize("block,stride", [(16, 16), (16, 4), (16, 1), (7, 3), (64, 64)])
def test_sliding_windows_score_every_token_once_with_its_windows_context(model, tokens, kind, block, stride):
    m = model if kind == "gpt" else PeriodicModel()
    got = perplexity(m, tokens, block_size=block, stride=stride, batch_size=3, progress=False)
    assert got["tokens"] == len(tokens) - 1
    assert got["loss"] == pytest.approx(_oracle(m, tokens, block, stride), abs=2e-5)


def test_less_context_costs_loss_and_overlap_wins_it_back():
    P, n = PeriodicModel.P, 60
    text = np.tile(np.random.default_rng(2).permutation(V)[:P], n // P + 1)[:n]
    m = PeriodicModel()
    full = perplexity(m, text, progress=False)  # one window: only the first P - 1 targets are guesses
    short = perplexity(m, text, block_size=8, progress=False)  # 8 windows, each guesses 4 targets
    overlapping = perplexity(m, text, block_size=8, stride=2, progress=False)  # >= 6 tokens of context each
    assert full["tokens"] == short["tokens"] == overlapping["tokens"] == n - 1
    confident = -math.log(math.exp(5) / (math.exp(5) + V - 1))  # loss of a token it can copy
    guess = math.log(V)  # loss of a uniform guess
    assert full["loss"] == pytest.approx(((P - 1) * guess + (n - P) * confident) / (n - 1), rel=1e-5)
    lengths = [8] * 7 + [3]  # 59 targets: 7 full windows and one of 3
    guesses = sum(min(P - 1, length) for length in lengths)  # the first P - 1 of each window
    assert short["loss"] == pytest.approx((guesses * guess + (n - 1 - guesses) * confident) / (n - 1), rel=1e-5)
    assert overlapping["loss"] == pytest.approx(full["loss"], rel=1e-5)


@pytest.mark.parametrize("n", [2, 3, 17, 64, 65, 100])
@pytest.mark.parametrize("block,stride", [(1, 1), (4, 4), (4, 1), (16, 5), (64, 64)])
def test_window_plan_tiles_the_targets(n, block, stride):
    plan = window_plan(n, block, stride)
    scored = [t for _, end, first in plan for t in range(first, end + 1)]
    assert scored == list(range(1, n))
    for i, (begin, end, first) in enumerate(plan):
        assert 0 < end - begin <= block and begin < first <= end + 1
        if 0 < i < len(plan) - 1:
            assert end - first + 1 == stride  # the middle windows score exactly their last `stride` targets


def test_bad_arguments_are_named(model, tokens):
    with pytest.raises(ValueError, match="skip tokens"):
        perplexity(model, tokens, block_size=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(model, tokens, block_size=65, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, tokens[:1], progress=False)
    with pytest.raises(ValueError, match="vocabulary of 97"):
        perplexity(model, np.array([1, 2, 97]), progress=False)


def test_token_files(tmp_path, tokens):
    tokens.tofile(tmp_path / "a.bin")
    np.save(tmp_path / "a.npy", tokens.astype(np.int32))
    assert np.array_equal(load_tokens(str(tmp_path / "a.bin")), tokens)
    assert np.array_equal(load_tokens(str(tmp_path / "a.npy")), tokens)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="whole number of uint16"):
        load_tokens(str(tmp_path / "odd.bin"))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_tokens(str(tmp_path / "missing.bin"))
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="must be integers"):
        load_tokens(str(tmp_path / "f.npy"))


def test_a_prepared_bin_is_read_with_its_meta_dtype_and_checked_tokenizer(tmp_path):
    from types import SimpleNamespace

    np.array([1, 70_000, 5], dtype=np.uint32).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text('{"dtype": "uint32", "tokenizer": "big", "n_vocab": 128256}')
    assert load_tokens(str(tmp_path / "train.bin")).tolist() == [1, 70_000, 5]
    big = SimpleNamespace(name="big", n_vocab=128256)
    assert load_tokens(str(tmp_path / "train.bin"), tokenizer=big).tolist() == [1, 70_000, 5]
    with pytest.raises(ValueError, match="was made by tokenizer 'big' \\(128256 ids\\), not by 'gpt2'"):
        load_tokens(str(tmp_path / "train.bin"), tokenizer=SimpleNamespace(name="gpt2", n_vocab=50257))
    (tmp_path / "meta.json").unlink()  # no meta.json: the dtype prepare would write for the tokenizer
    assert load_tokens(str(tmp_path / "train.bin"), tokenizer=big).tolist() == [1, 70_000, 5]


def test_corpus_splits_partition_the_stream(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("It was a dark and stormy night; the rain fell in torrents. " * 20)
    everything = load_tokens(str(text), progress=False)
    train = load_tokens(str(text), split="train", val_fraction=0.25, progress=False)
    val = load_tokens(str(text), split="val", val_fraction=0.25, progress=False)
    assert len(val) == round(0.25 * len(everything))
    assert np.array_equal(np.concatenate([train, val]), everything)
    with pytest.raises(ValueError, match="split"):
        load_tokens(str(text), split="test")
