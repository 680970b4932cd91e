"""The Triton LayerNorm and residual-add + LayerNorm kernels against ``kernels.reference``.

Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported triton, so the
kernels run in Triton's interpreter on the CPU; with CUDA the same tests run the real kernels.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import backends, reference  # noqa: E402
from kernels import fused_layernorm as fl  # noqa: E402

INTERPRETED = not isinstance(fl._ln_fwd_kernel, triton.runtime.JITFunction)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert INTERPRETED, "no CUDA and the Triton kernels are not interpreted: run pytest from the repo (tests/conftest.py)"

# dtype -> (atol, rtol) for outputs and gradients.  fp16: both sides compute in fp32 and round once
# (the reference rounds the add variant's gradient twice), so they agree to ~1-2 ulp.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 2e-3), torch.float64: (1e-10, 1e-10)}
WIDTHS = [1, 768, 1000, 4096]
ROWS = [1, 7, 33]


def _inputs(shape, dtype, param_dtype=None, seed=0):
    """x with a nonzero mean (exercises the two-pass variance), residual, weight, bias."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    param_dtype = param_dtype or dtype
    x = (1.5 + 2.0 * torch.randn(shape, generator=g)).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype)
    return [t.to(DEVICE).requires_grad_() for t in (x, r, w, b)]


def _close(ours, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_layer_norm(shape, dtype, param_dtype=None, eps=1e-5):
    x, _, w, b = _inputs(shape, dtype, param_dtype)
    y = fl.layer_norm(x, w, b, eps)
    y_ref = reference.layer_norm(x, w, b, eps)
    _close(y, y_ref, dtype, "y")
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        _close(g, g_ref, dtype, name)


def _check_add_layer_norm(shape, dtype, eps=1e-5):
    x, r, w, b = _inputs(shape, dtype)
    y, s = fl.add_layer_norm(x, r, w, b, eps)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, eps)
    _close(s, s_ref, dtype, "sum")
    _close(y, y_ref, dtype, "y")
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    ds = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)  # nonzero grad into the sum output
    grads = torch.autograd.grad((y, s), (x, r, w, b), (dy, ds))
    grads_ref = torch.autograd.grad((y_ref, s_ref), (x, r, w, b), (dy, ds))
    for name, g, g_ref in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_ref):
        _close(g, g_ref, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("M", ROWS)
def test_layer_norm_forward_and_grads_match_reference(M, C, dtype):
    _check_layer_norm((M, C), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("M", ROWS)
def test_add_layer_norm_forward_and_grads_match_reference(M, C, dtype):
    _check_add_layer_norm((M, C), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_width_8192_forward(dtype):
    x, r, w, b = (t.detach() for t in _inputs((3, 8192), dtype))
    _close(fl.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), dtype, "y")
    y, s = fl.add_layer_norm(x, r, w, b, 1e-5)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
    _close(y, y_ref, dtype, "add y")
    _close(s, s_ref, dtype, "add sum")


@pytest.mark.parametrize("C", [fl.SPLIT_C + 1, 3 * fl.WIDE_BLOCK_C + 5])
@pytest.mark.parametrize("fused_add", [False, True], ids=["ln", "add_ln"])
def test_wide_rows_take_the_two_kernel_backward(C, fused_add):
    """Past SPLIT_C the backward is dx in chunks + dW/dB by column blocks (the fused one would spill):
    every gradient still matches the reference, on rows that are not a multiple of either block."""
    assert C > fl.SPLIT_C
    if fused_add:
        _check_add_layer_norm((3, C), torch.float32)
    else:
        _check_layer_norm((3, C), torch.float32)


def test_wide_float64_rows_run_on_the_reference(monkeypatch):
    """fp64 rows past MAX_C_FP64 spill in registers: the op sends them to the reference, no kernel runs."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    x, r, w, b = (t.detach() for t in _inputs((2, fl.MAX_C_FP64 + 1), torch.float64))
    monkeypatch.setattr(fl, "_forward", no_launch)
    _close(fl.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), torch.float64, "fp64 wide")
    for ours, ref in zip(fl.add_layer_norm(x, r, w, b, 1e-5), reference.add_layer_norm(x, r, w, b, 1e-5)):
        _close(ours, ref, torch.float64, "fp64 wide add")


def test_saved_statistics_are_mean_and_rstd():
    x = torch.randn(5, 300, dtype=torch.float32).to(DEVICE) * 3 + 1
    w, b = torch.ones(300, device=DEVICE), torch.zeros(300, device=DEVICE)
    _, _, _, mean, rstd = fl._forward(x, None, w, b, 1e-5)
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-5))


def test_leading_dims_fp64_and_eps():
    _check_layer_norm((2, 3, 130), torch.float64, eps=1e-3)
    _check_add_layer_norm((2, 3, 130), torch.float64, eps=1e-3)


def test_params_in_another_dtype_than_x():
    """fp32 weight/bias with fp16 activations: output in x's dtype, param grads in fp32."""
    x, _, w, b = _inputs((6, 200), torch.float16, param_dtype=torch.float32)
    y = fl.layer_norm(x, w, b, 1e-5)
    y_ref = reference.layer_norm(x, w, b, 1e-5)
    assert y.dtype == torch.float16
    _close(y, y_ref, torch.float16, "y")
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    _close(dx, dx_ref, torch.float16, "dx")
    assert dw.dtype == db.dtype == torch.float32
    torch.testing.assert_close(dw, dw_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(db, db_ref, atol=1e-3, rtol=1e-3)


def test_strided_inputs_and_grads():
    """A row stride wider than C (a slice of a wider tensor), a strided weight, strided incoming grads."""
    C = 40
    base = torch.randn(5, 64, device=DEVICE)
    x = base[:, :C].requires_grad_()  # not contiguous: row stride 64
    res = torch.randn(5, 64, device=DEVICE)[:, 3 : 3 + C]
    w = torch.randn(C, 2, device=DEVICE)[:, 1].requires_grad_()  # weight with stride 2
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    dy = torch.randn(C, 5, device=DEVICE).t()  # column stride 5
    ds = torch.randn(5, 50, device=DEVICE)[:, :C]  # row stride 50
    out, out_ref = fl.add_layer_norm(x, res, w, b, 1e-5), reference.add_layer_norm(x, res, w, b, 1e-5)
    for o, o_ref in zip(out, out_ref):
        _close(o, o_ref, torch.float32, "strided forward")
    g = torch.autograd.grad(out, (x, w, b), (dy, ds))
    g_ref = torch.autograd.grad(out_ref, (x, w, b), (dy, ds))
    for a, a_ref in zip(g, g_ref):
        _close(a, a_ref, torch.float32, "strided grads")
    y, y_ref = fl.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5)
    _close(y, y_ref, torch.float32, "strided layer_norm")
    for a, a_ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)):
        _close(a, a_ref, torch.float32, "strided layer_norm grads")


def test_add_layer_norm_leaf_grads_and_unused_outputs():
    x, r, w, b = _inputs((4, 96), torch.float32)
    y, s = fl.add_layer_norm(x, r, w, b, 1e-5)
    (y.sum() + 2 * s.sum()).backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()  # one gradient, but two independent .grad tensors
    torch.testing.assert_close(x.grad, r.grad)
    x.grad.zero_()
    assert r.grad.abs().sum() > 0
    # only one of the two outputs used: the other's grad arrives as zeros
    y, s = fl.add_layer_norm(x, r, w, b, 1e-5)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
    for ours, ref in ((y, y_ref), (s, s_ref)):
        dx, dr = torch.autograd.grad(ours.pow(2).sum(), (x, r), retain_graph=True)
        dx_ref, _ = torch.autograd.grad(ref.pow(2).sum(), (x, r), retain_graph=True)
        _close(dx, dx_ref, torch.float32, "single-output dx")
        torch.testing.assert_close(dx, dr)


def test_empty_rows_and_wide_fallback():
    x, r, w, b = _inputs((0, 16), torch.float32)
    y, s = fl.add_layer_norm(x, r, w, b, 1e-5)
    assert y.shape == s.shape == (0, 16)
    dw, db = torch.autograd.grad(fl.layer_norm(x, w, b, 1e-5).sum(), (w, b))
    assert not dw.any() and not db.any()
    C = fl.MAX_C + 1  # beyond one row in registers: routed to the reference
    x, r, w, b = (t.detach() for t in _inputs((2, C), torch.float32))
    _close(fl.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), torch.float32, "wide")


def test_dispatch_through_the_public_api():
    """kernels.backend("triton") routes to these functions (skipped only while a sibling module is missing)."""
    reason = backends.unavailable_reason("triton", "layer_norm", torch.device(DEVICE))
    siblings = ("kernels.flash_attention", "kernels.fused_cross_entropy")
    if reason is not None and any(f"No module named '{m}'" in reason for m in siblings):
        pytest.skip(f"a sibling Triton module is not written yet: {reason}")
    assert reason is None, reason
    x, r, w, b = (t.detach() for t in _inputs((3, 5, 64), torch.float32))
    with kernels.backend("triton"):
        assert backends.resolve("layer_norm", x.device) is fl.layer_norm
        assert backends.resolve("add_layer_norm", x.device) is fl.add_layer_norm
        y = kernels.layer_norm(x, w, b)
        y2, s2 = kernels.add_layer_norm(x, r, w, b)
    _close(y, reference.layer_norm(x, w, b), torch.float32, "dispatched layer_norm")
    for o, o_ref in zip((y2, s2), reference.add_layer_norm(x, r, w, b)):
        _close(o, o_ref, torch.float32, "dispatched add_layer_norm")


# ----------------------------------------------------------------------------------------------
# GPU only (fp16/bf16 at real sizes against the fp32 reference, within 2x PyTorch's own error: tests/test_lowp.py)


@pytest.mark.gpu
def test_gpu_int64_row_offsets():
    """More than 2**31 elements: row * stride overflows int32, so the offsets must be int64."""
    if INTERPRETED:
        pytest.skip("the kernels were decorated for the interpreter")
    M, C = 2**31 // 8192 + 16, 8192
    if torch.cuda.mem_get_info()[0] < 2 * M * C * 2 + (2 << 30):  # x and y in bf16, plus slack
        pytest.skip("not enough free GPU memory for a > 2**31-element tensor")
    x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(C, device="cuda", dtype=torch.bfloat16)
    y = fl.layer_norm(x, w, b, 1e-5)
    tail = slice(M - 16, M)
    torch.testing.assert_close(y[tail], reference.layer_norm(x[tail], w, b, 1e-5), atol=2e-2, rtol=2e-2)
