"""RMSNorm and residual-add + RMSNorm (``kernels.rms_norm`` / ``kernels.add_rms_norm``) on every backend.

* the reference against the fp64 formula ``x / sqrt(mean(x**2) + eps) * w``, on ordinary and hostile
  rows (constant, all-zero, entries near 1e20 and 1e-20 whose squares overflow or underflow fp32,
  large offsets), forward and every gradient;
* every backend that runs here -- torch, pytorch, triton (Triton's interpreter on the CPU, set up by
  tests/conftest.py), cuda (the extension's C++ CPU kernels; its CUDA kernels on a GPU) -- against the
  reference: fp32, fp16 and bf16 (bf16 Triton only on a GPU: the interpreter does not emulate it),
  widths that are not powers of two, 1-D/3-D and non-contiguous inputs, fp32 weights with fp16 x;
* inputs the API must refuse, the C++ ops' own TORCH_CHECKs and ``torch.library.opcheck``;
* on the device (``-m gpu``; ``LLM_GPU_DRY_RUN=1`` runs them on the CPU at tiny sizes): fp16/bf16
  error against the fp32 reference at most twice PyTorch's own (``F.rms_norm``), as tests/test_lowp.py.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import backends, reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["torch", "pytorch", "triton", "cuda"]
OPS = ["rms_norm", "add_rms_norm"]
EPS = 1e-6

# dtype -> (atol, rtol) against the reference.  Our kernels and the reference both compute in fp32 and
# round once, so in 16 bits they agree to ~1-2 ulp of the output.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
# (M, C): C = 1, primes, a width that is no multiple of the vector width, 2048 + 3 (a 4096-wide block)
SHAPES = [(1, 1), (33, 7), (5, 127), (33, 1000), (9, 2048 + 3)]


def _need(backend: str, op: str = "rms_norm", dtype: torch.dtype = torch.float32, device=DEVICE) -> None:
    reason = backends.unavailable_reason(backend, op, torch.device(device))
    if reason:
        pytest.skip(reason)
    if backend == "triton" and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 (this case runs on a GPU)")


def _call(backend: str, op: str, *args):
    """The public API (so the inputs are validated) on one backend; always a tuple of outputs."""
    with kernels.backend(backend):
        out = getattr(kernels, op)(*args)
    return out if isinstance(out, tuple) else (out,)


def _naive(x, weight, eps=EPS):
    """The formula itself in fp64, where no fp32 value's square can overflow or underflow."""
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def _naive_op(op, x, r, w, eps=EPS):
    if op == "rms_norm":
        return (_naive(x, w, eps),)
    s = x.double() + r.double()
    return _naive(s, w, eps), s


def _inputs(shape, dtype, w_dtype=None, seed=0, device=DEVICE):
    """x (a nonzero mean: RMSNorm does not subtract it), residual, weight; leaves that need grad."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (0.5 + 2.0 * torch.randn(shape, generator=g)).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(w_dtype or dtype)
    return [t.to(device).requires_grad_() for t in (x, r, w)]


def _args(op, x, r, w, eps=EPS):
    return (x, w, eps) if op == "rms_norm" else (x, r, w, eps)


def _leaves(op, x, r, w):
    return (x, w) if op == "rms_norm" else (x, r, w)


def _grad_names(op):
    return ("dx", "dweight") if op == "rms_norm" else ("dx", "dresidual", "dweight")


def _out_grads(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]


def _close(ours, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (
        f"{what}: {ours.dtype}{tuple(ours.shape)} vs {ref.dtype}{tuple(ref.shape)}")
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _rel_err(ours, exact, scale=None) -> float:
    """max |ours - exact| relative to ``scale``, by default exact's largest magnitude."""
    exact = exact.detach().double()
    scale = exact.abs().max() if scale is None else scale
    return ((ours.detach().double() - exact).abs().max() / max(float(scale), 1e-300)).item()


def _grad_scales(op, x, r, w, dys, eps=EPS) -> dict[str, float]:
    """The size of the terms each gradient is a sum of, in fp64: dx = rstd * (g - x_hat * mean(g * x_hat))
    subtracts two terms of size ~rstd * |g| (g = dy * w), which cancel where the row is dominated by one
    entry (C = 1: dx = rstd * g * eps / (x^2 + eps)); any fp32 arithmetic then errs by ulp(rstd * |g|),
    not by ulp(|dx|).  dweight sums |dy * x_hat| over the rows."""
    s = x.double() if op == "rms_norm" else x.double() + r.double()
    rstd = torch.rsqrt((s * s).mean(-1, keepdim=True) + eps)
    dy = dys[0].double()
    dx = (rstd * (dy * w.double()).abs()).max().item()
    if op == "add_rms_norm":
        dx += dys[1].double().abs().max().item()
    dw = (dy * s * rstd).abs().sum(dim=tuple(range(s.dim() - 1))).max().item()
    return {"dx": dx, "dresidual": dx, "dweight": dw}


def _check_against_reference(backend, op, shape, dtype, w_dtype=None, eps=EPS):
    x, r, w = _inputs(shape, dtype, w_dtype)
    outs = _call(backend, op, *_args(op, x, r, w, eps))
    outs_ref = _call("torch", op, *_args(op, x, r, w, eps))
    for name, o, o_ref in zip(("y", "sum"), outs, outs_ref):
        _close(o, o_ref, dtype, f"{backend} {op} {name}")
    dys = _out_grads(outs)
    leaves = _leaves(op, x, r, w)
    grads = torch.autograd.grad(outs, leaves, dys)
    grads_ref = torch.autograd.grad(outs_ref, leaves, dys)
    for name, g, g_ref in zip(_grad_names(op), grads, grads_ref):
        # dweight at the weight's own precision (the pytorch backend rounds weight to x's dtype first)
        tol = w.dtype if name == "dweight" and backend != "pytorch" else dtype
        _close(g, g_ref, tol, f"{backend} {op} {name}")


# ------------------------------------------------------------------------ the reference vs fp64


def _hostile_rows(C: int) -> dict[str, torch.Tensor]:
    """fp32 rows an honest model can produce, and rows whose squares leave fp32's range."""
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(C, generator=g)
    return {
        "ordinary": noise,
        "constant": torch.full((C,), -3.7),
        "all zero": torch.zeros(C),
        "huge 1e20": 1e20 * noise,  # x**2 ~ 1e40: inf in fp32
        "huge constant 1e30": torch.full((C,), 1e30),
        "tiny 1e-20": 1e-20 * noise,  # x**2 ~ 1e-40: a denormal in fp32 (zero on a GPU)
        "tiny 1e-30": 1e-30 * noise,  # below sqrt(eps) by far: y is x / sqrt(eps)
        "offset 1e4": 1e4 + noise,
        "offset -3e4": -3e4 + 0.1 * noise,
        "one spike": torch.zeros(C).index_fill_(0, torch.tensor([C // 3]), 5e19),
    }


HOSTILE = list(_hostile_rows(8))
UNSCALED = {"huge 1e20", "huge constant 1e30", "tiny 1e-20", "tiny 1e-30", "one spike"}  # out of x**2's fp32 range


def _hostile(case: str, C: int, M: int = 3) -> torch.Tensor:
    row = _hostile_rows(C)[case]
    return torch.stack([row * (1 + 0.25 * i) if case != "all zero" else row for i in range(M)])  # (M, C)


@pytest.mark.parametrize("C", [1, 7, 1000])
@pytest.mark.parametrize("case", HOSTILE)
def test_reference_matches_the_fp64_formula(case, C):
    x = _hostile(case, C).requires_grad_()
    r = torch.zeros_like(x, requires_grad=True)
    w = (1.0 + 0.5 * torch.randn(C, generator=torch.Generator().manual_seed(2))).requires_grad_()
    for op in OPS:
        outs = _call("torch", op, *_args(op, x, r, w))
        exact = _naive_op(op, x, r, w)
        for name, o, e in zip(("y", "sum"), outs, exact):
            assert o.dtype == torch.float32 and torch.isfinite(o).all(), f"{op} {name} not finite"
            assert _rel_err(o, e) <= 2e-6, f"{op} {name}: {_rel_err(o, e):.3g}"
        dys = _out_grads(outs)
        leaves = _leaves(op, x, r, w)
        grads = torch.autograd.grad(outs, leaves, dys)
        grads_exact = torch.autograd.grad(exact, leaves, [d.double() for d in dys])
        scales = _grad_scales(op, x, r, w, dys)
        for name, g, e in zip(_grad_names(op), grads, grads_exact):
            assert torch.isfinite(g).all(), f"{op} {name} not finite"
            err = _rel_err(g, e, scales[name])
            assert err <= 1e-5, f"{op} {name}: {err:.3g}"


def test_reference_on_float64_and_its_eps():
    x, r, w = _inputs((4, 33), torch.float64)
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(reference.rms_norm(x, w, eps), _naive(x, w, eps), atol=1e-12, rtol=1e-12)
        y, s = reference.add_rms_norm(x, r, w, eps)
        torch.testing.assert_close(s, x + r)
        torch.testing.assert_close(y, _naive(x + r, w, eps), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------ every backend vs the reference


@pytest.mark.parametrize("M,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_every_gradient_match_the_reference(backend, op, dtype, M, C):
    _need(backend, op, dtype)
    _check_against_reference(backend, op, (M, C), dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_and_three_dimensional_x(backend, op):
    _need(backend, op)
    _check_against_reference(backend, op, (130,), torch.float32)
    _check_against_reference(backend, op, (2, 3, 130), torch.float32, eps=1e-3)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_with_fp16_x(backend, op):
    """fp32 parameters beside fp16 activations: outputs in x's dtype, dweight in fp32."""
    _need(backend, op, torch.float16)
    x, r, w = _inputs((6, 200), torch.float16, w_dtype=torch.float32)
    outs = _call(backend, op, *_args(op, x, r, w))
    assert all(o.dtype == torch.float16 for o in outs)
    grads = torch.autograd.grad(outs, _leaves(op, x, r, w), _out_grads(outs))
    assert grads[-1].dtype == torch.float32 and all(g.dtype == torch.float16 for g in grads[:-1])
    _check_against_reference(backend, op, (6, 200), torch.float16, w_dtype=torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_grads(backend, op):
    """A row stride wider than C (a slice of a wider tensor), a strided weight, strided incoming grads."""
    _need(backend, op)
    C = 40
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 64, generator=g).to(DEVICE)[:, :C].requires_grad_()  # row stride 64
    r = torch.randn(5, 64, generator=g).to(DEVICE)[:, 3:3 + C].requires_grad_()
    w = torch.randn(C, 2, generator=g).to(DEVICE)[:, 1].requires_grad_()  # stride 2
    dys = [torch.randn(C, 5, generator=g).to(DEVICE).t(), torch.randn(5, 50, generator=g).to(DEVICE)[:, :C]]
    outs = _call(backend, op, *_args(op, x, r, w))
    outs_ref = _call("torch", op, *_args(op, x, r, w))
    for o, o_ref in zip(outs, outs_ref):
        _close(o, o_ref, torch.float32, f"{backend} {op} strided forward")
    leaves = _leaves(op, x, r, w)
    for name, a, b in zip(_grad_names(op), torch.autograd.grad(outs, leaves, dys[:len(outs)]),
                          torch.autograd.grad(outs_ref, leaves, dys[:len(outs)])):
        _close(a, b, torch.float32, f"{backend} {op} strided {name}")


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_rows_match_the_fp64_formula(backend, case):
    """The kernels scale a row by a power of two before squaring it: rows near 1e20 (x**2 = inf in
    fp32) and 1e-20 come out as the fp64 formula says, forward and backward.  F.rms_norm squares in
    fp32 (1e20 rows normalize to 0), so the pytorch backend is held to that only where x**2 fits."""
    _need(backend, "add_rms_norm")
    if backend == "pytorch" and case in UNSCALED:
        pytest.skip("F.rms_norm squares x in fp32: x**2 overflows (or underflows) there")
    C = 1000
    x = _hostile(case, C).to(DEVICE).requires_grad_()
    r = torch.zeros_like(x, requires_grad=True)
    w = (1.0 + 0.5 * torch.randn(C, generator=torch.Generator().manual_seed(2))).to(DEVICE).requires_grad_()
    for op in OPS:
        outs = _call(backend, op, *_args(op, x, r, w))
        exact = _naive_op(op, x, r, w)
        for name, o, e in zip(("y", "sum"), outs, exact):
            assert _rel_err(o, e) <= 2e-6, f"{backend} {op} {name}: {_rel_err(o, e):.3g}"
        dys = _out_grads(outs)
        leaves = _leaves(op, x, r, w)
        grads = torch.autograd.grad(outs, leaves, dys)
        exact_grads = torch.autograd.grad(exact, leaves, [d.double() for d in dys])
        scales = _grad_scales(op, x, r, w, dys)
        for name, g, e in zip(_grad_names(op), grads, exact_grads):
            err = _rel_err(g, e, scales[name])
            assert err <= 1e-5, f"{backend} {op} {name}: {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_constant_row_normalizes_to_plus_or_minus_one(backend):
    _need(backend, "add_rms_norm")
    x = torch.full((3, 768), -3.7, device=DEVICE)
    w = torch.full((768,), 2.0, device=DEVICE)
    for y in (_call(backend, "rms_norm", x, w)[0], _call(backend, "add_rms_norm", x, 0 * x, w)[0]):
        want = -2.0 / torch.sqrt(torch.tensor(1 + EPS / 3.7**2, dtype=torch.float64))
        assert (y.double() - want).abs().max() <= 1e-6, f"{backend}: {y[0, :4]}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_add_variant_leaf_grads_and_unused_outputs(backend):
    """x and residual get the same gradient in two independent .grad tensors; an unused output's
    gradient arrives as zeros."""
    _need(backend, "add_rms_norm")
    x, r, w = _inputs((4, 96), torch.float32)
    y, s = _call(backend, "add_rms_norm", x, r, w)
    (y.sum() + 2 * s.sum()).backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, r.grad)
    for used in (0, 1):
        outs = _call(backend, "add_rms_norm", x, r, w)
        outs_ref = _call("torch", "add_rms_norm", x, r, w)
        dx, dr = torch.autograd.grad(outs[used].pow(2).sum(), (x, r))
        dx_ref, _ = torch.autograd.grad(outs_ref[used].pow(2).sum(), (x, r))
        _close(dx, dx_ref, torch.float32, f"{backend}: only output {used} used")
        torch.testing.assert_close(dx, dr)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_empty_rows(backend):
    _need(backend, "add_rms_norm")
    x, r, w = _inputs((0, 16), torch.float32)
    y, s = _call(backend, "add_rms_norm", x, r, w)
    assert y.shape == s.shape == (0, 16)
    (dw,) = torch.autograd.grad(_call(backend, "rms_norm", x, w)[0].sum(), (w,))
    assert dw.shape == (16,) and not dw.any()


def test_dispatch_through_the_public_api():
    """kernels.backend(name) runs our registered functions (each backend that can run here)."""
    for name in ("triton", "cuda"):
        if backends.unavailable_reason(name, "rms_norm", DEVICE) is not None:
            continue
        with kernels.backend(name):
            for op in OPS:
                assert backends.resolve(op, DEVICE) is backends._IMPLS[name][op]
    if backends.unavailable_reason("triton", "rms_norm", DEVICE) is None:
        from kernels import fused_rmsnorm as fr
        assert backends._IMPLS["triton"]["rms_norm"] is fr.rms_norm
    if backends.unavailable_reason("cuda", "rms_norm", DEVICE) is None:
        from kernels import _cuda_backend
        assert backends._IMPLS["cuda"]["add_rms_norm"] is _cuda_backend.add_rms_norm


# ------------------------------------------------------------------------ the Triton kernels' paths


def _fr():
    _need("triton", "add_rms_norm")
    from kernels import fused_rmsnorm
    return fused_rmsnorm


@pytest.mark.parametrize("op", OPS)
def test_triton_wide_rows_take_the_two_kernel_backward(op):
    """Past SPLIT_C the backward is dx in chunks + dW by column blocks: rows that are a multiple of
    neither block still match the reference in every gradient."""
    fr = _fr()
    for C in (fr.SPLIT_C + 1, 3 * fr.WIDE_BLOCK_C + 5):
        _check_against_reference("triton", op, (3, C), torch.float32)


def test_triton_rows_past_max_c_and_float64_run_on_the_reference(monkeypatch):
    fr = _fr()

    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(fr, "_forward", no_launch)
    for shape, dtype in (((2, fr.MAX_C + 1), torch.float32), ((3, 40), torch.float64)):
        x, r, w = (t.detach() for t in _inputs(shape, dtype))
        _close(fr.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), dtype, "unfused rms_norm")
        for o, o_ref in zip(fr.add_rms_norm(x, r, w, EPS), reference.add_rms_norm(x, r, w, EPS)):
            _close(o, o_ref, dtype, "unfused add_rms_norm")


def test_triton_saves_rstd():
    fr = _fr()
    x = (torch.randn(5, 300) * 3 + 1).to(DEVICE)
    _, _, _, rstd = fr._forward(x, None, torch.ones(300, device=DEVICE), 1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-5))


@pytest.mark.gpu
def test_gpu_triton_int64_row_offsets():
    """More than 2**31 elements: row * stride overflows int32, so the offsets must be int64."""
    fr = _fr()
    M, C = 2**31 // 8192 + 16, 8192
    if torch.cuda.mem_get_info()[0] < 2 * M * C * 2 + (2 << 30):  # x and y in bf16, plus slack
        pytest.skip("not enough free GPU memory for a > 2**31-element tensor")
    x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, device="cuda", dtype=torch.bfloat16)
    y = fr.rms_norm(x, w, EPS)
    tail = slice(M - 16, M)
    torch.testing.assert_close(y[tail], reference.rms_norm(x[tail], w, EPS), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------ the API's validation


def _bad_api_calls():
    x, w = torch.randn(4, 8), torch.randn(8)
    return [
        (TypeError, "rms_norm: x must be a torch.Tensor", lambda: kernels.rms_norm([1.0], w)),
        (TypeError, "rms_norm: x must be a floating-point tensor", lambda: kernels.rms_norm(x.int(), w)),
        (ValueError, r"rms_norm: weight must have shape \(8,\)", lambda: kernels.rms_norm(x, torch.randn(7))),
        (ValueError, "rms_norm: x must have a non-empty last dimension", lambda: kernels.rms_norm(torch.randn(4, 0), w[:0])),
        (TypeError, "rms_norm: weight must be a floating-point tensor", lambda: kernels.rms_norm(x, w.long())),
        (ValueError, "rms_norm: eps must be a finite positive number", lambda: kernels.rms_norm(x, w, 0.0)),
        (ValueError, "rms_norm: eps must be a finite positive number", lambda: kernels.rms_norm(x, w, float("nan"))),
        (TypeError, "rms_norm: eps must be a real number", lambda: kernels.rms_norm(x, w, "1e-6")),
        (ValueError, "rms_norm: all tensors must be on the same device", lambda: kernels.rms_norm(x, w.to("meta"))),
        (ValueError, "add_rms_norm: residual must have x's shape", lambda: kernels.add_rms_norm(x, x[:, :7], w)),
        (TypeError, "add_rms_norm: tensors must share one dtype", lambda: kernels.add_rms_norm(x, x.double(), w)),
        (TypeError, "add_rms_norm: residual must be a torch.Tensor", lambda: kernels.add_rms_norm(x, None, w)),
        (ValueError, r"add_rms_norm: weight must have shape \(8,\)", lambda: kernels.add_rms_norm(x, x, w[:4])),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_api_calls())))
def test_bad_inputs_raise_the_api_errors(backend, case):
    """The public API refuses them before any backend runs, whichever is selected."""
    error, message, call = _bad_api_calls()[case]
    with kernels.backend(backend), pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------ the C++ ops (kernels._C)


def _ops():
    _need("cuda", "add_rms_norm", device="cpu")
    return torch.ops.llm_kernels


def test_opcheck_forward_ops():
    ops = _ops()
    for dtype, w_dtype in ((torch.float32, None), (torch.float64, None), (torch.bfloat16, torch.float32)):
        x, r, w = _inputs((7, 33), dtype, w_dtype, device="cpu")
        torch.library.opcheck(ops.rms_norm_fwd.default, (x, w, 1e-5))
        torch.library.opcheck(ops.add_rms_norm_fwd.default, (x, r, w, 1e-5))
    x, r, w = (t.detach() for t in _inputs((5, 16), torch.float32, device="cpu"))
    torch.library.opcheck(ops.rms_norm_fwd.default, (x, w, 1e-3))
    torch.library.opcheck(ops.add_rms_norm_fwd.default, (x, r, w, 1e-3))
    for shape in ((2, 3, 16), (16,)):  # the ops take x (..., C) as it is
        x, r, w = _inputs(shape, torch.float32, device="cpu")
        torch.library.opcheck(ops.rms_norm_fwd.default, (x, w, 1e-5))
        torch.library.opcheck(ops.add_rms_norm_fwd.default, (x, r, w, 1e-5))


def test_opcheck_backward_op():
    ops = _ops()
    x, r, w = (t.detach() for t in _inputs((7, 33), torch.float32, device="cpu"))
    _, rstd = ops.rms_norm_fwd(x, w, 1e-5)
    torch.library.opcheck(ops.rms_norm_bwd.default, (r, x, w, rstd, None))
    torch.library.opcheck(ops.rms_norm_bwd.default, (r, x, w, rstd, x * 2))


def test_cpp_ops_outputs_and_saved_rstd():
    ops = _ops()
    x, r = torch.randn(5, 300) * 3 + 1, torch.randn(5, 300)
    w = torch.ones(300)
    y, rstd = ops.rms_norm_fwd(x, w, 1e-5)
    assert y.is_contiguous() and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-5))
    y2, total, rstd2 = ops.add_rms_norm_fwd(x, r, w, 1e-5)
    torch.testing.assert_close(total, x + r)
    y3, rstd3 = ops.rms_norm_fwd(total, w, 1e-5)
    assert torch.equal(y2, y3) and torch.equal(rstd2, rstd3)
    dy, ds = torch.randn(5, 300), torch.randn(5, 300)
    dx, dw = ops.rms_norm_bwd(dy, total, w, rstd2, None)
    dx_s, dw_s = ops.rms_norm_bwd(dy, total, w, rstd2, ds)
    torch.testing.assert_close(dx_s, dx + ds)
    assert torch.equal(dw, dw_s)
    y4, rstd4 = ops.rms_norm_fwd(x.view(5, 1, 300), w, 1e-5)  # (..., C): rstd has x's leading dims
    assert y4.shape == (5, 1, 300) and rstd4.shape == (5, 1) and torch.equal(y4.view(5, 300), y)


def _bad_cpp_calls():
    ops = torch.ops.llm_kernels
    x, w = torch.randn(4, 8), torch.randn(8)
    _, rstd = ops.rms_norm_fwd(x, w, 1e-5)
    return [
        ("rms_norm_fwd", "weight", lambda: ops.rms_norm_fwd(x, torch.randn(9), 1e-5)),
        ("rms_norm_fwd", "weight", lambda: ops.rms_norm_fwd(x, w.half(), 1e-5)),
        ("rms_norm_fwd", "x", lambda: ops.rms_norm_fwd(torch.randn(()), w, 1e-5)),
        ("rms_norm_fwd", "x", lambda: ops.rms_norm_fwd(torch.randn(4, 0), w[:0], 1e-5)),
        ("rms_norm_fwd", "weight", lambda: ops.rms_norm_fwd(torch.randn(2, 3, 8), torch.randn(3), 1e-5)),
        ("rms_norm_fwd", "x", lambda: ops.rms_norm_fwd(torch.ones(4, 8, dtype=torch.int32), w, 1e-5)),
        ("add_rms_norm_fwd", "residual", lambda: ops.add_rms_norm_fwd(x, torch.randn(4, 7), w, 1e-5)),
        ("add_rms_norm_fwd", "residual", lambda: ops.add_rms_norm_fwd(x, x.double(), w, 1e-5)),
        ("rms_norm_bwd", "dy", lambda: ops.rms_norm_bwd(torch.randn(4, 7), x, w, rstd, None)),
        ("rms_norm_bwd", "rstd", lambda: ops.rms_norm_bwd(x, x, w, rstd.double(), None)),
        ("rms_norm_bwd", "rstd", lambda: ops.rms_norm_bwd(x, x, w, rstd[:3], None)),
        ("rms_norm_bwd", "dsum", lambda: ops.rms_norm_bwd(x, x, w, rstd, x[:, :4])),
    ]


@pytest.mark.parametrize("case", range(12))
def test_cpp_bad_inputs_raise_naming_the_tensor(case):
    _ops()
    op, name, call = _bad_cpp_calls()[case]
    with pytest.raises(RuntimeError, match=rf"{op}: {name}\b.*shape.*dtype"):
        call()


def test_cpp_bad_eps_raises():
    ops = _ops()
    with pytest.raises(RuntimeError, match="rms_norm_fwd: eps must be a finite positive number, got -1"):
        ops.rms_norm_fwd(torch.randn(2, 3), torch.ones(3), -1.0)


def test_cuda_backend_casts_other_weight_dtypes_to_fp32():
    """weight in neither x's dtype nor fp32 (here fp64 beside fp32 x): cast to fp32 for the kernel, its
    gradient back in fp64."""
    _need("cuda", "rms_norm")
    x, _, w = _inputs((3, 50), torch.float32, w_dtype=torch.float64)
    (y,) = _call("cuda", "rms_norm", x, w)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    assert y.dtype == torch.float32 and dw.dtype == torch.float64
    _close(y, reference.rms_norm(x, w.float()), torch.float32, "y")


def test_cuda_backend_compiles_as_one_graph():
    """register_fake + register_autograd: torch.compile traces the public API, forward and backward, in one graph."""
    _need("cuda", "add_rms_norm")
    torch._dynamo.reset()

    def f(x, r, w):
        y, s = kernels.add_rms_norm(x * 2.0, r, w)
        return kernels.rms_norm(y + s, w).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, r, w = _inputs((3, 5, 64), torch.float32)
    with kernels.backend("cuda"):
        out = compiled(x, r, w)
    grads = torch.autograd.grad(out.sum(), (x, r, w))
    with kernels.backend("torch"):
        ref = f(x, r, w)
    grads_ref = torch.autograd.grad(ref.sum(), (x, r, w))
    _close(out, ref, torch.float32, "compiled forward")
    for name, g, g_ref in zip(("dx", "dresidual", "dweight"), grads, grads_ref):
        _close(g, g_ref, torch.float32, f"compiled {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 768, 1000, 4096, 1023])
def test_gpu_cuda_kernels_vector_and_scalar_paths(C, dtype):
    _need("cuda", "add_rms_norm", dtype, device="cuda")
    for op in OPS:
        _check_against_reference("cuda", op, (37, C), dtype)
        _check_against_reference("cuda", op, (37, C), dtype, w_dtype=torch.float32)
    # an unaligned view (offset by one element) must take the scalar path and still be right
    ops = torch.ops.llm_kernels
    x = torch.randn(9, C + 1, device="cuda").to(dtype)[:, 1:]
    r = torch.randn(9, C, device="cuda").to(dtype)
    w = torch.randn(C, device="cuda").to(dtype)
    y, _ = ops.rms_norm_fwd(x, w, EPS)
    _close(y, reference.rms_norm(x, w, EPS), dtype, "unaligned y")
    y, total, _ = ops.add_rms_norm_fwd(x, r, w, EPS)
    for o, o_ref in zip((y, total), reference.add_rms_norm(x, r, w, EPS)):
        _close(o, o_ref, dtype, "unaligned add")


@pytest.mark.gpu
def test_gpu_opcheck():
    _need("cuda", "add_rms_norm", device="cuda")
    ops = torch.ops.llm_kernels
    x, r, w = _inputs((7, 256), torch.bfloat16, w_dtype=torch.float32, device="cuda")
    torch.library.opcheck(ops.rms_norm_fwd.default, (x, w, 1e-5))
    torch.library.opcheck(ops.add_rms_norm_fwd.default, (x, r, w, 1e-5))
    x, r, w = (t.detach() for t in (x, r, w))
    _, rstd = ops.rms_norm_fwd(x, w, 1e-5)
    torch.library.opcheck(ops.rms_norm_bwd.default, (r, x, w, rstd, x))


# ------------------------------------------------------------------------ low precision on the device

LOWP_WIDTHS = [768, 1000, 4096, 8192, 12288, 16384] if CUDA else [768, 1000]
LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times the reference's largest magnitude


def _value_and_grads(fn, inputs, grads):
    """fn's outputs and the gradients of its outputs w.r.t. fresh copies of inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [*outs, *torch.autograd.grad(outs, leaves, grads[:len(outs)])]


@pytest.mark.gpu
@pytest.mark.dry_run
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("C", LOWP_WIDTHS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_low_precision_error_is_at_most_twice_pytorchs(lowp, backend, op, C, dtype):
    lowp.start(backend, op, dtype)
    _need(backend, op, dtype)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (8, 509, C) if CUDA else (3, 7, C)  # 4072 rows: not a multiple of the program count
    x = (0.5 + 2.0 * torch.randn(shape, device=DEVICE, generator=g)).to(dtype)
    r = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    w = (1.0 + 0.5 * torch.randn(C, device=DEVICE, generator=g)).to(dtype)
    dys = [torch.randn(shape, device=DEVICE, generator=g).to(dtype) for _ in range(2)]
    inputs = (x, w) if op == "rms_norm" else (x, r, w)

    def ours(*t):
        with kernels.backend(backend):
            return getattr(kernels, op)(*t, EPS)

    def pytorch(*t):
        if op == "rms_norm":
            return F.rms_norm(t[0], (C,), t[1], EPS)
        s = t[0] + t[1]
        return F.rms_norm(s, (C,), t[2], EPS), s

    def exact(*t):
        return getattr(reference, op)(*t, EPS)

    mine = _value_and_grads(ours, inputs, dys)
    theirs = _value_and_grads(pytorch, inputs, dys)
    truth = _value_and_grads(exact, [t.float() for t in inputs], [d.float() for d in dys])
    names = ("y", *(("sum",) if op == "add_rms_norm" else ()), *_grad_names(op))
    for t in mine:
        assert t.dtype == dtype
    lowp.compare({n: (o, t, e) for n, o, t, e in zip(names, mine, theirs, truth)}, atol=LOWP_ATOL[dtype])
