"""The pure-PyTorch reference against torch.nn.functional, forward and every gradient.

The reference is the oracle for every other backend, so it is itself checked against PyTorch's own
implementations (the ones it must not call) on fresh random inputs with awkward shapes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
DTYPES = [torch.float32, torch.float64]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,H,Tq,Tk,D",
    [(1, 1, 1, 1, 16), (2, 3, 17, 17, 16), (1, 2, 97, 97, 80), (2, 1, 5, 33, 64), (1, 2, 1, 57, 32)],
)
def test_attention_matches_sdpa(dtype, B, H, Tq, Tk, D):
    torch.manual_seed(Tq * 31 + Tk)
    q, k, v = leaves(torch.randn(B, H, Tq, D, dtype=dtype), torch.randn(B, H, Tk, D, dtype=dtype), torch.randn(B, H, Tk, D, dtype=dtype))
    q2, k2, v2 = leaves(q, k, v)
    out = kernels.causal_attention(q, k, v)
    # bottom-right aligned causal mask: query i sees keys <= i + Tk - Tq
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    expected = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)
    assert out.dtype == dtype and out.shape == (B, H, Tq, D)
    assert_close(out, expected, dtype, "attention output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for name, a, b in (("dq", q, q2), ("dk", k, k2), ("dv", v, v2)):
        assert_close(a.grad, b.grad, dtype, name)


def test_attention_custom_scale_and_noncontiguous_views():
    torch.manual_seed(0)
    B, T, H, D = 2, 19, 3, 16
    qkv = torch.randn(B, T, 3 * H * D)  # like the output of a fused QKV projection
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))  # (B, H, T, D) views
    assert not q.is_contiguous()
    out = kernels.causal_attention(q, k, v, scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_attention_first_query_sees_only_first_key():
    # With Tq == Tk the first output row must equal v[0] exactly: its only visible key is itself.
    q, k, v = torch.randn(3, 1, 1, 6, 8).unbind(0)
    out = kernels.causal_attention(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (3, 768), (2, 7, 1000), (4, 4096)])
def test_layer_norm_matches_functional(dtype, shape):
    torch.manual_seed(shape[-1])
    C = shape[-1]
    x, w, b = leaves(torch.randn(shape, dtype=dtype) * 3 + 1, torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype))
    x2, w2, b2 = leaves(x, w, b)
    out = kernels.layer_norm(x, w, b, eps=1e-5)
    expected = F.layer_norm(x2, (C,), w2, b2, eps=1e-5)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "layer_norm output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for name, a, b_ in (("dx", x, x2), ("dweight", w, w2), ("dbias", b, b2)):
        assert_close(a.grad, b_.grad, dtype, name)


def _ce_inputs(N, V, dtype, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, dtype=dtype, generator=g) * 4
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V,ignore_frac", [(1, 7, 0.0), (13, 7, 0.3), (9, 50257, 0.0), (6, 50257, 0.5)])
def test_cross_entropy_matches_functional(dtype, N, V, ignore_frac):
    logits, targets = _ce_inputs(N, V, dtype, ignore_frac, seed=N * V)
    if (targets == -100).all():
        targets[0] = 3
    (a,), (b,) = leaves(logits), leaves(logits)
    loss = kernels.cross_entropy(a, targets)
    expected = F.cross_entropy(b, targets)
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close(loss, expected, dtype, "loss")
    loss.backward()
    expected.backward()
    assert_close(a.grad, b.grad, dtype, "dlogits")


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    logits = torch.randn(4, 7, requires_grad=True)
    loss = kernels.cross_entropy(logits, torch.full((4,), -1, dtype=torch.long), ignore_index=-1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_cross_entropy_leading_dims_and_low_precision_returns_fp32():
    logits, targets = _ce_inputs(12, 11, torch.float32, 0.2, seed=1)
    expected = F.cross_entropy(logits, targets)
    loss = kernels.cross_entropy(logits.view(3, 4, 11).half(), targets.view(3, 4))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,V,ignore_frac", [(7, 16, 7, 0.0), (11, 48, 50257, 0.4)])
def test_linear_cross_entropy_matches_unfused(dtype, N, C, V, ignore_frac):
    torch.manual_seed(N + C)
    h, w = leaves(torch.randn(N, C, dtype=dtype), torch.randn(V, C, dtype=dtype) / math.sqrt(C))
    h2, w2 = leaves(h, w)
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignore_frac] = -100
    loss = kernels.linear_cross_entropy(h, w, targets)
    expected = F.cross_entropy(h2 @ w2.t(), targets)
    assert_close(loss, expected, dtype, "loss")
    loss.backward()
    expected.backward()
    assert_close(h.grad, h2.grad, dtype, "dhidden")
    assert_close(w.grad, w2.grad, dtype, "dweight")


def test_reference_is_exact_under_autocast():
    # An autocast region around the model must not turn the oracle's matmuls into bf16 ones.
    q, k, v = torch.randn(3, 1, 2, 9, 16).unbind(0)
    plain = reference.causal_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reference.causal_attention(q, k, v)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, atol=0, rtol=0)


def test_reference_never_calls_pytorch_fast_paths(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference must not call PyTorch's fused op")

    for name in ("scaled_dot_product_attention", "layer_norm", "cross_entropy"):
        monkeypatch.setattr(F, name, forbidden)
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    out = reference.causal_attention(q, q, q).sum() + reference.layer_norm(x, torch.ones(8), torch.zeros(8)).sum()
    out = out + reference.linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 1, 4]))
    out.backward()
    assert q.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_matches_add_then_functional(dtype):
    torch.manual_seed(5)
    C = 1000
    x, r, w, b = leaves(torch.randn(3, 5, C, dtype=dtype), torch.randn(3, 5, C, dtype=dtype), torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype))
    x2, r2, w2, b2 = leaves(x, r, w, b)
    y, s = kernels.add_layer_norm(x, r, w, b)
    s2 = x2 + r2
    y2 = F.layer_norm(s2, (C,), w2, b2)
    assert_close(s, s2, dtype, "sum")
    assert_close(y, y2, dtype, "normalized")
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    (y * gy + s * gs).sum().backward()
    (y2 * gy + s2 * gs).sum().backward()
    for name, a, b_ in (("dx", x, x2), ("dresidual", r, r2), ("dweight", w, w2), ("dbias", b, b2)):
        assert_close(a.grad, b_.grad, dtype, name)


def test_attention_backward_is_the_true_gradient():
    """The reference's attention has its own backward for q @ k^T (kernels/reference.py, _Scores): on
    finite inputs it is the exact gradient, checked by finite differences in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for T in (5, 7, 7))
    assert torch.autograd.gradcheck(lambda q, k, v: reference.causal_attention(q, k, v), (q, k, v))


# ------------------------------------------------------------------------ grouped-query attention


def _gqa_inputs(B, H, H_kv, Tq, Tk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H_kv, Tk, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, generator=g, dtype=dtype)


def _per_head_loop(q, k, v, scale=None):
    """Attention written head by head, query head h reading k/v head h // (H / H_kv): the GQA
    definition itself, with no repeat_interleave."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    heads = []
    for h in range(H):
        kh, vh = k[:, h // (H // H_kv)], v[:, h // (H // H_kv)]  # (B, Tk, D)
        s = (q[:, h] @ kh.transpose(-2, -1) * scale).masked_fill(~keep, float("-inf"))  # (B, Tq, Tk)
        heads.append(torch.softmax(s, dim=-1) @ vh)  # (B, Tq, D)
    return torch.stack(heads, dim=1)  # (B, H, Tq, D)


@pytest.mark.parametrize(
    "B,H,H_kv,Tq,Tk,D",
    [(1, 4, 1, 17, 17, 16), (2, 4, 2, 9, 9, 64), (1, 8, 2, 1, 13, 16), (1, 8, 4, 5, 33, 80), (2, 6, 3, 7, 7, 8)],
)
def test_gqa_attention_matches_a_per_head_loop_and_sums_the_group_gradients(B, H, H_kv, Tq, Tk, D):
    q, k, v, do = _gqa_inputs(B, H, H_kv, Tq, Tk, D)
    group = H // H_kv
    ql, kl, vl = leaves(q, k, v)
    out = reference.causal_attention(ql, kl, vl)
    assert out.shape == (B, H, Tq, D)
    assert_close(out, _per_head_loop(q, k, v), torch.float64, "GQA output vs the per-head loop")
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), do)
    assert dk.shape == k.shape and dv.shape == v.shape
    # the same attention as MHA on k/v repeated for each query head: its dk, dv summed over each group
    qm, km, vm = leaves(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
    dq_m, dk_m, dv_m = torch.autograd.grad(reference.causal_attention(qm, km, vm), (qm, km, vm), do)
    assert_close(dq, dq_m, torch.float64, "dq")
    assert_close(dk, dk_m.view(B, H_kv, group, Tk, D).sum(2), torch.float64, "dk = sum over the group")
    assert_close(dv, dv_m.view(B, H_kv, group, Tk, D).sum(2), torch.float64, "dv = sum over the group")
    # and PyTorch's own GQA
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, sdpa, torch.float64, "GQA output vs SDPA enable_gqa")


def test_gqa_backward_is_the_true_gradient():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: reference.causal_attention(q, k, v), (q, k, v))


@pytest.mark.parametrize("H,H_kv", [(4, 3), (3, 2), (2, 4)])
def test_gqa_rejects_heads_that_are_not_a_multiple(H, H_kv):
    q, k, v, _ = _gqa_inputs(1, H, H_kv, 4, 4, 8)
    with pytest.raises(ValueError, match=rf"q's {H} heads must be a multiple of k/v's {H_kv}"):
        kernels.causal_attention(q, k, v)
