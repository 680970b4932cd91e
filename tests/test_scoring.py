"""llm.scoring against a direct computation from the model's logits."""
import math

import pytest
import torch

from llm.model import GPT, GPTConfig
from llm.scoring import sequence_logprobs, token_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


def test_token_logprobs_match_softmax_of_logits(model):
    idx = torch.randint(0, 13, (2, 6))
    targets = torch.randint(0, 13, (2, 6))
    targets[0, :3] = -100  # e.g. a masked prompt
    with torch.no_grad():
        got = token_logprobs(model, idx, targets)
        logits, _ = model(idx)
    for b in range(2):
        for t in range(6):
            if targets[b, t] == -100:
                assert got[b, t] == 0
            else:
                row = logits[b, t].double()
                want = row[targets[b, t]] - math.log(row.exp().sum())
                assert got[b, t].item() == pytest.approx(want.item(), abs=1e-5)
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(model, idx, targets), got.sum(-1))
    # the loss the model computes is minus the mean of the same numbers
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(-(got.sum() / (targets != -100).sum()).item(), abs=1e-5)


def test_shape_mismatch_is_named(model):
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_logprobs(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


# ---- the chunked head against the unfused computation ------------------------------------------------

def _unfused_token_logprobs(model, idx, targets, ignore_index=-100):
    """The reference: full (B, T, V) logits, fp32 log_softmax, gather."""
    logits, _ = model(idx)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked))


def _tiny(vocab_size, tied=True, preset=None, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, vocab_size=vocab_size, block_size=64, n_layer=1) if preset else GPTConfig(
        vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16, **kw)
    m = GPT(cfg)
    if not tied:
        m.untie_weights()
    return m


def _grads(model, fn, idx, targets, weights):
    model.zero_grad(set_to_none=True)
    out = fn(model, idx, targets)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("B,T,chunk,V", [(1, 7, 3, 13), (2, 17, 5, 97), (3, 11, 64, 13), (1, 9, 4, 50257)])
def test_chunked_equals_unfused_in_value_and_gradients(tied, B, T, chunk, V):
    model = _tiny(V, tied=tied)
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets[0, : T // 2] = -100  # ignored rows, in and across chunk boundaries
    weights = torch.randn(B, T)  # a non-uniform upstream gradient
    want, want_g = _grads(model, _unfused_token_logprobs, idx, targets, weights)
    got, got_g = _grads(model, lambda m, i, t: token_logprobs(m, i, t, chunk_size=chunk), idx, targets, weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[targets == -100] == 0).all()
    assert got_g.keys() == want_g.keys() and model.lm_head.weight.grad is not None
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_chunked_matches_on_rope_models(preset):
    model = _tiny(97, preset=preset)
    idx = torch.randint(0, 97, (2, 13))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    w = torch.ones(2, 13)
    want, want_g = _grads(model, _unfused_token_logprobs, idx, targets, w)
    got, got_g = _grads(model, lambda m, i, t: token_logprobs(m, i, t, chunk_size=6), idx, targets, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_with_lora_head_and_bf16_autocast():
    from llm.finetune.lora import apply_lora
    model = _tiny(61, tied=False)
    apply_lora(model, rank=2, alpha=4.0, targets="c_attn,lm_head")
    for n, p in model.named_parameters():  # make B non-zero so the adapters change the logits
        if "lora" in n:
            torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    w = torch.randn(2, 10)
    want, want_g = _grads(model, _unfused_token_logprobs, idx, targets, w)
    got, got_g = _grads(model, lambda m, i, t: token_logprobs(m, i, t, chunk_size=7), idx, targets, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("lora" in n for n in got_g)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # head in bf16, upcast per chunk
        lowp = token_logprobs(model, idx, targets, chunk_size=7)
        ref = _unfused_token_logprobs(model, idx, targets)
    assert lowp.dtype == torch.float32
    torch.testing.assert_close(lowp, ref, atol=1e-5, rtol=1e-5)


def test_chunk_size_must_be_positive(model):
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, idx, idx, chunk_size=0)


class _PeakTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors created under the mode and still alive (each storage counted once, freed
    when its last tensor dies).  PyTorch's MemTracker (llm/train/memory.py) cannot be used here: it refuses a
    module (the LM head) called more than once per iteration, which is what chunking does."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in self.seen and st.nbytes():
                    self.seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def _peak(step):
    with _PeakTensorBytes() as mode:
        step()
    return mode.peak


def test_chunked_peak_memory_is_a_fraction_of_the_unfused(capsys):
    """B*T = 1024 tokens at GPT-2's V = 50257 on a tiny model: forward + backward peak of new tensors."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=512, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 50257, (2, 512))
    targets = torch.roll(idx, -1, dims=1)

    def step(fn):
        return lambda: fn(model, idx, targets).sum().backward()

    unfused = _peak(step(_unfused_token_logprobs))
    chunked = _peak(step(token_logprobs))
    with capsys.disabled():
        print(f"\npeak fwd+bwd, B*T=1024, V=50257: unfused {unfused / 2**20:.0f} MB, chunked {chunked / 2**20:.0f} MB")
    assert 0 < chunked < unfused / 3
