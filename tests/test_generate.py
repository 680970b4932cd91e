"""Generation: sampling rules, KV-cache equivalence, EOS handling, batched prompts."""
import math

import pytest
import torch

from llm.generate import generate, generate_text, sample_next, stream, stream_text
from llm.model import GPT, GPTConfig


class ByteTokenizer:
    """The tokenizer interface generate_text needs: bytes are tokens 0..255, 256 is end-of-text."""

    eot_token = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class NoEosTokenizer(ByteTokenizer):
    """Like a tokenizer.json without an end-of-text token: eos_token_id None, and eot_token raises."""

    eos_token_id = None

    @property
    def eot_token(self):
        raise ValueError("this tokenizer has no end-of-text token")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # block_size 16 so that the generation tests cross it; a random model is fine for equivalences
    return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=16)).eval()


def prompt(B=3, T=5, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- sample_next ------------------------------------------------------------------------------


def test_sample_next_greedy_and_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    assert sample_next(logits, temperature=0).tolist() == [0, 3]
    g = torch.Generator().manual_seed(0)

    def draws(**kw):  # (400, 2) samples
        return torch.stack([sample_next(logits, generator=g, **kw) for _ in range(400)])

    top2 = draws(top_k=2)
    assert set(top2[:, 0].tolist()) == {0, 1} and set(top2[:, 1].tolist()) == {2, 3}
    nucleus = draws(top_p=0.7)  # 0.5 < 0.7 <= 0.5 + 0.3: the two most likely tokens
    assert set(nucleus[:, 0].tolist()) == {0, 1} and set(nucleus[:, 1].tolist()) == {2, 3}
    assert set(draws(top_p=0.45)[:, 0].tolist()) == {0}
    assert set(draws()[:, 0].tolist()) == {0, 1, 2, 3}
    # a low temperature sharpens toward the argmax
    assert (draws(temperature=0.05)[:, 0] == 0).all()


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sampling_argument_validation(model, kw, name):
    with pytest.raises(ValueError, match=name):
        sample_next(torch.zeros(1, 5), **kw)
    with pytest.raises(ValueError, match=name):
        stream(model, prompt(), 3, **kw)  # raised at call time, not on first iteration
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt(), -1)


# ---- generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T, n", [(5, 8), (5, 30), (20, 6)])  # inside, crossing, and starting past block_size
def test_kv_cache_greedy_equals_recompute(model, T, n):
    idx = prompt(B=3, T=T)
    cached = generate(model, idx, n, temperature=0, use_cache=True)
    uncached = generate(model, idx, n, temperature=0, use_cache=False)
    assert cached.shape == (3, T + n)
    assert torch.equal(cached[:, :T], idx)
    assert torch.equal(cached, uncached)


@pytest.fixture(scope="module", params=["llama-tiny", "qwen3-tiny"])
def rope_model(request):
    """The Llama 3 / Qwen3 architectures (RoPE, grouped-query attention, Qwen3's q/k norms), made smaller."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(request.param, vocab_size=257, block_size=16, n_layer=2)
    return GPT(cfg).eval()


@pytest.mark.parametrize("T, n", [(5, 8), (5, 30), (20, 6)])  # inside, crossing, and starting past block_size
def test_kv_cache_greedy_equals_recompute_with_rope_and_gqa(rope_model, T, n):
    assert rope_model.rotary is not None and rope_model.config.n_kv_head < rope_model.config.n_head
    idx = prompt(B=3, T=T)
    cached = generate(rope_model, idx, n, temperature=0, use_cache=True)
    uncached = generate(rope_model, idx, n, temperature=0, use_cache=False)
    assert cached.shape == (3, T + n) and torch.equal(cached[:, :T], idx)
    assert torch.equal(cached, uncached)


def test_rows_are_independent(model):
    idx = prompt(B=3, T=6)
    batch = generate(model, idx, 12, temperature=0)
    for b in range(3):
        assert torch.equal(generate(model, idx[b : b + 1], 12, temperature=0), batch[b : b + 1])


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    idx = prompt()
    greedy = generate(model, idx, 10, temperature=0)
    assert torch.equal(generate(model, idx, 10, top_k=1, generator=torch.Generator().manual_seed(1)), greedy)
    assert torch.equal(generate(model, idx, 10, top_p=1e-6, generator=torch.Generator().manual_seed(2)), greedy)


def test_seeded_sampling_is_reproducible(model):
    idx = prompt()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, idx, 20, temperature=1.0, top_k=50, top_p=0.95, generator=gen)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_eos_stops_rows_and_pads(model):
    idx = prompt(B=3, T=4)
    free = generate(model, idx, 12, temperature=0)[:, 4:]  # (3, 12)
    eos = int(free[0, 3])  # a token row 0 emits at step 3 (maybe earlier too)
    out = generate(model, idx, 12, temperature=0, eos_token_id=eos)[:, 4:]
    stops = [row.tolist().index(eos) if eos in row.tolist() else None for row in free]
    n_expected = 12 if None in stops else max(stops) + 1  # stop once every row has finished
    assert out.shape == (3, n_expected)
    for b, stop in enumerate(stops):
        end = n_expected if stop is None else stop + 1
        assert torch.equal(out[b, :end], free[b, :end])
        assert (out[b, end:] == eos).all()  # finished rows are padded with eos


def test_generate_restores_mode_and_needs_no_grad(model):
    model.train()
    try:
        out = generate(model, prompt(), 3, temperature=0)
        assert model.training and not out.requires_grad
        steps = list(stream(model, prompt(), 4, temperature=0))
        assert len(steps) == 4 and steps[0].shape == (3,) and steps[0].dtype == torch.long
        assert torch.is_grad_enabled()
    finally:
        model.eval()
    assert torch.equal(generate(model, prompt(), 0), prompt())


# ---- text -------------------------------------------------------------------------------------


def test_generate_text_mixed_lengths_keep_order(model):
    tok = ByteTokenizer()
    prompts = ["hello", "ab", "", "world", "xy", "é"]  # lengths 5, 2, 1 (eot), 5, 2, 2
    together = generate_text(model, tok, prompts, max_new_tokens=6, temperature=0, eos_token_id=None)
    alone = [generate_text(model, tok, p, max_new_tokens=6, temperature=0, eos_token_id=None)[0] for p in prompts]
    assert together == alone
    # each completion is the decoded continuation of that prompt alone
    ids = torch.tensor([tok.encode("ab")])
    expected = tok.decode(generate(model, ids, 6, temperature=0)[0, 2:].tolist())
    assert together[1] == expected


def test_generate_text_cuts_at_eot(model):
    tok = ByteTokenizer()
    free = generate(model, torch.tensor([tok.encode("ab")]), 8, temperature=0)[0, 2:].tolist()
    eos = free[2]
    text = generate_text(model, tok, ["ab"], max_new_tokens=8, temperature=0, eos_token_id=eos)[0]
    assert text == tok.decode(free[: free.index(eos)])


def test_stream_text_with_gpt2_tokenizer():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # offline without TIKTOKEN_CACHE_DIR
        pytest.skip(f"GPT-2 encoding unavailable: {exc}")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_preset("tiny"))
    pieces = list(stream_text(gpt, enc, "To be, or not", max_new_tokens=12, temperature=0))
    assert "".join(pieces) == generate_text(gpt, enc, "To be, or not", max_new_tokens=12, temperature=0)[0]


def test_a_tokenizer_without_eos_generates_to_max_new_tokens(model):
    tok = NoEosTokenizer()
    with pytest.raises(ValueError, match="no end-of-text token"):
        generate_text(model, tok, "", 4)  # an empty prompt needs the end-of-text token to condition on
    text = generate_text(model, tok, "ab", 6, temperature=0.0)[0]
    assert text == "".join(stream_text(model, tok, "ab", 6, temperature=0.0))
    ids = generate(model, torch.tensor([[97, 98]]), 6, temperature=0.0, eos_token_id=None)[0, 2:].tolist()
    assert len(ids) == 6 and text == tok.decode(ids)  # all six: no eos to stop at
