"""The Triton FlashAttention-2 kernels (kernels/flash_attention.py) against the pure-PyTorch reference,
multi-head and grouped-query (k/v with fewer heads).

Without a GPU the kernels run in Triton's interpreter on the CPU (see the TRITON_INTERPRET note below).
The interpreter is slow: shapes are small and
chosen so that every T and every D appear at least once rather than the full cross product.
"""
import math

import pytest
import torch

import kernels
from kernels import backends, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported triton, so the
# kernels below run in Triton's interpreter on the CPU.
triton = pytest.importorskip("triton")
from kernels import flash_attention as fa  # noqa: E402

if DEVICE == "cpu":
    assert fa.INTERPRET, "no CUDA and the Triton kernels are not interpreted: run pytest from the repo (tests/conftest.py)"


SIBLINGS = ("fused_layernorm", "fused_cross_entropy")


def _inputs(B, H, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype) for T in (Tq, Tk, Tk))
    do = torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype)
    return q, k, v, do


def _run(fn, q, k, v, do, scale=None):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, scale)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, dq, dk, dv


def _assert_matches(q, k, v, do, scale=None, atol=1e-4, rtol=1e-4):
    ours = _run(fa.causal_attention, q, k, v, do, scale)
    ref = _run(reference.causal_attention, *(t.float() for t in (q, k, v, do)), scale)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


# every T in {1, 17, 97, 128, 257} and every D in {16, 64, 80, 128} at least once; 80 is not a power of 2
@pytest.mark.parametrize(
    "T,D,H",
    [(1, 16, 1), (1, 128, 1), (17, 64, 2), (17, 80, 1), (97, 16, 1), (97, 80, 1), (128, 128, 1), (128, 64, 2),
     (257, 64, 1), (257, 80, 1), (33, 8, 1)],  # D=8 < 16: padded up to tl.dot's minimum
)
def test_fp32_matches_reference(T, D, H):
    _assert_matches(*_inputs(1, H, T, T, D))


@pytest.mark.parametrize("T,D", [(17, 16), (97, 64), (128, 80)])
def test_fp16_matches_reference(T, D):
    _assert_matches(*_inputs(1, 1, T, T, D, torch.float16), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "Tq,Tk,D",
    [(1, 1, 64), (1, 33, 64), (1, 97, 80), (5, 33, 16), (17, 100, 64), (96, 257, 16)],
)
def test_fewer_queries_than_keys_bottom_right_mask(Tq, Tk, D):
    """KV-cache decoding: the Tq queries are the last Tq positions of the Tk keys."""
    _assert_matches(*_inputs(1, 1, Tq, Tk, D))


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_custom_scale(scale):
    _assert_matches(*_inputs(1, 1, 40, 40, 16), scale=scale)


def test_batch_and_heads_use_their_own_slices():
    _assert_matches(*_inputs(2, 3, 19, 19, 16))


def test_lse_is_the_log_sum_exp_of_the_scaled_masked_scores():
    q, k, v, _ = _inputs(1, 2, 23, 40, 16)
    _, lse = fa.flash_attention_forward(q, k, v)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(16)
    keep = torch.ones(23, 40, dtype=torch.bool, device=DEVICE).tril(diagonal=40 - 23)
    expected = scores.masked_fill(~keep, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 23)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)


def test_non_contiguous_views_of_a_fused_qkv_projection():
    """q, k, v sliced out of a (B, T, 3, H, D) tensor: strided views, gradients flow back to the fused tensor."""
    B, T, H, D = 2, 37, 2, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    grads = []
    for fn in (fa.causal_attention, reference.causal_attention):
        x = qkv.clone().requires_grad_(True)
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
        assert not q.is_contiguous()
        o = fn(q, k, v)
        (o * do).sum().backward()
        grads.append((o.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)


def test_float64_falls_back_to_the_reference():
    q, k, v, _ = _inputs(1, 1, 9, 9, 16, torch.float64)
    torch.testing.assert_close(fa.causal_attention(q, k, v), reference.causal_attention(q, k, v))


def test_dispatch_through_the_public_api():
    reason = backends.unavailable_reason("triton", "causal_attention", torch.device(DEVICE))
    if reason and any(s in reason for s in SIBLINGS):
        pytest.skip(f"a sibling Triton module is not there yet: {reason}")
    q, k, v, do = _inputs(1, 2, 21, 21, 64)
    with kernels.backend("triton"):
        ours = _run(kernels.causal_attention, q, k, v, do)
    ref = _run(reference.causal_attention, q, k, v, do)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ grouped-query attention
# k/v with H_kv < H heads: query head h reads k/v head h // (H / H_kv); dk, dv sum over each group.


def _gqa_inputs(B, H, H_kv, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, H_kv, Tk, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype)


# H_kv in {1, 2}, H in {4, 8}; every D in {16, 64, 80, 128}; odd T; decoding (Tq < Tk, Tq = 1); T = 70
# spans several tiles of both the forward (32 rows) and dK/dV (16 queries per step) interpreter configs
@pytest.mark.parametrize(
    "B,H,H_kv,Tq,Tk,D",
    [(1, 4, 1, 17, 17, 16), (1, 4, 2, 33, 33, 64), (1, 8, 2, 19, 19, 80), (1, 8, 1, 1, 40, 128),
     (2, 4, 2, 5, 37, 16), (1, 4, 1, 70, 70, 16)],
)
def test_gqa_fp32_matches_reference(B, H, H_kv, Tq, Tk, D):
    _assert_matches(*_gqa_inputs(B, H, H_kv, Tq, Tk, D))


@pytest.mark.parametrize("B,H,H_kv,Tq,Tk,D", [(1, 4, 2, 17, 17, 64), (1, 8, 1, 1, 33, 16)])
def test_gqa_fp16_matches_reference(B, H, H_kv, Tq, Tk, D):
    _assert_matches(*_gqa_inputs(B, H, H_kv, Tq, Tk, D, torch.float16), atol=1e-2, rtol=1e-2)


def test_gqa_lse_is_per_query_head():
    q, k, v, _ = _gqa_inputs(1, 4, 2, 11, 20, 16)
    _, lse = fa.flash_attention_forward(q, k, v)
    _, lse_mha = fa.flash_attention_forward(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    assert lse.shape == (1, 4, 11)
    torch.testing.assert_close(lse, lse_mha, atol=1e-5, rtol=1e-5)


def test_gqa_views_of_a_fused_qkv_projection():
    """How a Llama-style model calls it: q, k, v sliced out of one (B, T, H + 2*H_kv, D) projection and
    transposed to (B, heads, T, D) views; the gradients reach the fused tensor, k and v never copied."""
    B, T, H, H_kv, D = 2, 23, 4, 2, 16
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, T, H + 2 * H_kv, D, generator=g).to(DEVICE)
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    results = []
    for fn in (fa.causal_attention, reference.causal_attention):
        x = qkv.clone().requires_grad_(True)
        q, k, v = (t.transpose(1, 2) for t in x.split([H, H_kv, H_kv], dim=2))  # (B, heads, T, D) views
        assert not q.is_contiguous() and k.stride(1) == D and k.stride(2) == (H + 2 * H_kv) * D
        o = fn(q, k, v)
        (o * do).sum().backward()
        results.append((o.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)


def test_gqa_heads_not_a_multiple_raise_the_validation_error():
    q, k, v, _ = _gqa_inputs(1, 4, 3, 5, 5, 16)
    with kernels.backend("triton"), pytest.raises(ValueError, match="q's 4 heads must be a multiple of k/v's 3"):
        kernels.causal_attention(q, k, v)


# ------------------------------------------------------------------------------------------- GPU only
# (fp16/bf16 at real sizes against the fp32 reference, within 2x PyTorch's own error: tests/test_lowp.py)


@pytest.mark.gpu
def test_gpu_decoding_a_batch_of_more_than_65535_heads():
    """B*H = 70,000 programs: more than CUDA allows on grid axis 1, fine on axis 0 where they now are."""
    q, k, v, _ = _inputs(1000, 70, 1, 64, 64, torch.bfloat16)
    out = fa.causal_attention(q, k, v)
    torch.testing.assert_close(out.float(), reference.causal_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_offsets_past_2_pow_31():
    """B*H*T*D > 2^31 elements: the last batch element lives past a 32-bit offset."""
    B, H, T, D = 1040, 16, 1024, 128  # 2^31 + 2^25 elements per tensor, 4.4 GB in fp16
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.float16) for _ in range(3))
    assert q.numel() > 2**31
    o = fa.causal_attention(q, k, v)
    expected = reference.causal_attention(q[-1:], k[-1:], v[-1:])
    torch.testing.assert_close(o[-1:], expected, atol=2e-2, rtol=2e-2)
