"""Hostile inputs, for every backend that runs here: numbers an honest model produces (huge logits,
constant or offset rows), integer types the API accepts, non-finite values, impossible targets.

Each backend is compared with an fp64 oracle (the reference run on float64 inputs), within about
twice the error PyTorch's own op makes in the same precision; the cases come from the test suites of
Liger-Kernel, flash-attention and ml-cross-entropy, and from the audit of issue 11.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import backends, reference
from kernels._attention_tiles import MAX_BLOCK_M

BACKENDS = [b for b in ("torch", "pytorch", "triton", "cuda") if backends.unavailable_reason(b, "cross_entropy",
                                                                                             torch.device("cpu")) is None]


def _on(backend, op):
    fn = getattr(kernels, op)

    def run(*args, **kwargs):
        with kernels.backend(backend):
            return fn(*args, **kwargs)
    return run


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _ce_and_grad(fn, logits, targets):
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, targets)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


# ---------------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["all 1e4", "1e4 + noise", "-1e4 + noise"])
def test_cross_entropy_keeps_its_precision_on_huge_logits(backend, case):
    """loss = log d - (z_y - m) with the terms apart: no error of ulp(max |z|) (1e-3 at 1e4)."""
    g = torch.Generator().manual_seed(0)
    N, V = 6, 1000
    base = {"all 1e4": 1e4, "1e4 + noise": 1e4, "-1e4 + noise": -1e4}[case]
    noise = 0.0 if case == "all 1e4" else 3.0
    logits = base + noise * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    exact = _ce_and_grad(reference.cross_entropy, logits.double(), y)
    ours = _ce_and_grad(_on(backend, "cross_entropy"), logits, y)
    torch_ = _ce_and_grad(lambda z, t: F.cross_entropy(z, t), logits, y)
    for name, o, t, e in zip(("loss", "dlogits"), ours, torch_, exact):
        assert _err(o, e) <= 2 * _err(t, e) + 1e-6, f"{name}: ours {_err(o, e):.3g} vs PyTorch {_err(t, e):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_are_accepted_everywhere(backend):
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(5, 17, generator=g), torch.randint(0, 17, (5,), generator=g)
    y[2] = -100
    want = reference.cross_entropy(logits, y)
    torch.testing.assert_close(_on(backend, "cross_entropy")(logits, y.int()), want)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(17, 8, generator=g)
    torch.testing.assert_close(_on(backend, "linear_cross_entropy")(hidden, weight, y.int()),
                               reference.linear_cross_entropy(hidden, weight, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_follow_log_softmax(backend):
    """The semantics the reference's docstring states: NaN or +inf in a row -> NaN loss and gradient
    for that row; a -inf logit is probability 0 (finite loss unless it is the target's: +inf)."""
    V = 7
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, 1] = float("-inf")
    logits[3, 2] = float("-inf")
    y = torch.tensor([0, 0, 0, 2])
    ce = _on(backend, "cross_entropy")
    for row, expect in ((0, "nan"), (1, "nan"), (2, "finite"), (3, "inf")):
        loss, grad = _ce_and_grad(ce, logits[row: row + 1], y[row: row + 1])
        if expect == "nan":
            assert torch.isnan(loss) and torch.isnan(grad).all(), (row, loss, grad)
        elif expect == "finite":
            want = _ce_and_grad(reference.cross_entropy, logits[row: row + 1].double(), y[row: row + 1])
            torch.testing.assert_close(loss.double(), want[0], atol=1e-6, rtol=1e-6)
            assert grad[0, 1] == 0 and torch.isfinite(grad).all()
        else:
            assert loss == float("inf"), (row, loss)


def test_targets_outside_the_vocabulary_are_an_error_without_a_host_sync():
    """The Triton and extension backends check targets on the device (torch._assert_async: on a GPU a
    device-side assert at the next sync), after the API's own check of CPU tensors."""
    from kernels import _chunked_linear_ce

    y = torch.tensor([1, 9, -100])
    _chunked_linear_ce.check_targets(torch.tensor([1, 4, -100]), 5, -100)  # fine
    with pytest.raises(RuntimeError, match=r"outside \[0, 5\) and is not ignore_index=-100"):
        _chunked_linear_ce.check_targets(y, 5, -100)
    for backend in [b for b in BACKENDS if b in ("triton", "cuda")]:
        impl = backends._IMPLS[backend]["cross_entropy"]  # below the API's own (host-side) check
        with pytest.raises(RuntimeError, match="outside"):
            impl(torch.randn(3, 5), y, -100)
        impl = backends._IMPLS[backend]["linear_cross_entropy"]
        with pytest.raises(RuntimeError, match="outside"):
            impl(torch.randn(3, 4), torch.randn(5, 4), y, -100)


# -------------------------------------------------------------------------------------- LayerNorm

LN_BACKENDS = [b for b in ("torch", "pytorch", "triton", "cuda")
               if backends.unavailable_reason(b, "layer_norm", torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", LN_BACKENDS)
@pytest.mark.parametrize("C", [768, 1000, 4096])
def test_a_constant_row_normalizes_to_exactly_zero(backend, C):
    x = torch.full((3, C), -3.7)
    w, b = torch.full((C,), 2.0), torch.full((C,), 0.25)
    for fn in (lambda: _on(backend, "layer_norm")(x, w, b), lambda: _on(backend, "add_layer_norm")(x, 0 * x, w, b)[0]):
        y = fn()
        assert _err(y, b.expand_as(y)) <= 1e-6, f"{backend} C={C}: max |y - b| = {_err(y, b.expand_as(y)):.3g}"


@pytest.mark.parametrize("backend", LN_BACKENDS)
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_rows_with_a_large_offset_keep_their_precision(backend, offset):
    g = torch.Generator().manual_seed(3)
    C = 1024
    x = offset + torch.randn(4, C, generator=g)
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    exact = reference.layer_norm(x.double(), w.double(), b.double())
    ours = _on(backend, "layer_norm")(x, w, b)
    torch_ = F.layer_norm(x, (C,), w, b)
    assert _err(ours, exact) <= 2 * _err(torch_, exact) + 1e-5, (_err(ours, exact), _err(torch_, exact))


# -------------------------------------------------------------------------------------- attention

# "pytorch" is SDPA as PyTorch ships it, left alone on purpose (see kernels/_pytorch_backend.py)
ATTN_BACKENDS = [b for b in ("torch", "triton", "cuda")
                 if backends.unavailable_reason(b, "causal_attention", torch.device("cpu")) is None]


# how many rows before a bad position a backend may turn to NaN (kernels/reference.py, causal_attention)
REACH_BACK = {"torch": 0, "cuda": 0, "triton": MAX_BLOCK_M - 1}


@pytest.mark.parametrize("backend,device", [(b, "cpu") for b in ATTN_BACKENDS] + [
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])  # the CUDA kernels (bench/gpu_check.sh runs it)
@pytest.mark.parametrize("where,bad", [("v", float("nan")), ("v", float("inf")), ("k", float("nan")),
                                       ("q", float("nan")), ("q", float("inf"))])
@pytest.mark.parametrize("Tq,Tk,pos", [(40, 40, 5), (40, 40, 20), (40, 40, 38), (24, 40, 5), (24, 40, 20),
                                       (24, 40, 38), (300, 300, 290), (200, 300, 250)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_non_finite_value_never_reaches_the_past(backend, device, where, bad, pos, Tq, Tk, dtype):
    """The reference's semantics, in every backend: the rows that attend to a non-finite value are not
    finite (all NaN on torch and cuda), the rows before it -- and their dq -- are what they are without
    it (the same backend on the clean inputs, and the reference), whatever tiles the kernel uses; on
    triton the rows of its diagonal tile (at most MAX_BLOCK_M - 1 back) may be NaN instead, never wrong."""
    g = torch.Generator().manual_seed(4)
    D = 16
    q, k, v = (torch.randn(1, 2, T, D, generator=g).to(device, dtype) for T in (Tq, Tk, Tk))
    clean = [t.clone() for t in (q, k, v)]
    target = {"q": q, "k": k, "v": v}[where]
    if where == "q" and pos >= Tq:
        pytest.skip("no such query")
    target[0, 0, pos, 3] = bad
    offset = Tk - Tq
    first_row = pos if where == "q" else max(0, pos - offset)  # rows >= this one see the bad value
    sees = torch.zeros(Tq, dtype=torch.bool)
    sees[first_row:] = True
    if where == "q":
        sees[pos + 1:] = False  # a query's own values reach only its own row
    exact = ~sees  # the rows that must come out as without it
    if where != "q":
        exact[max(0, first_row - REACH_BACK[backend]):] = False
    window = ~sees & ~exact  # triton's diagonal tile: as without it, or NaN

    def run(fn, inputs):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in inputs)
        out = fn(qq, kk, vv)
        out[0, 0, exact].float().sum().backward()  # gradients from the rows that must be exact
        return out.detach(), qq.grad
    out, dq = run(_on(backend, "causal_attention"), (q, k, v))
    if REACH_BACK[backend] == 0:
        assert torch.isnan(out[0, 0, sees]).all(), f"rows that see the bad value must be NaN: {out[0, 0].isnan().any(-1)}"
    else:
        assert not torch.isfinite(out[0, 0, sees]).all(-1).any(), "rows that see the bad value must not be finite"
    runs = [run(_on(backend, "causal_attention"), clean)]  # the same kernel, the same tiles: as good as exact
    if dtype == torch.float32:  # (in fp16 the reference differs by fp16 rounding, as every backend does)
        runs.append(run(reference.causal_attention, clean))
    tol = {"atol": 1e-5, "rtol": 1e-5}
    assert exact[:max(0, first_row - REACH_BACK[backend])].all() and (exact.any() or Tq < 100)  # the case tests something
    for ref, ref_dq in runs:
        torch.testing.assert_close(out[0, 0, exact], ref[0, 0, exact], **tol)
        torch.testing.assert_close(out[0, 1], ref[0, 1], **tol)  # another head: untouched
        torch.testing.assert_close(dq[0, 0, exact], ref_dq[0, 0, exact], **tol)
        w, rw = out[0, 0, window], ref[0, 0, window]
        torch.testing.assert_close(torch.where(w.isnan(), rw, w), rw, **tol)  # NaN, or right
