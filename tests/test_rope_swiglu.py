"""RoPE and SwiGLU on every backend: the reference against independent formulations, then "torch",
"pytorch", "triton" (Triton's interpreter without a GPU) and "cuda" (the extension's C++ CPU kernels
without a GPU, its CUDA kernels in the tests marked ``gpu``) against the reference, forward and every
gradient, at the shapes and layouts the model uses: q and k as transposed views of a fused QKV
projection (k with fewer heads), gate and up as the two halves of one projection, T = 1 decoding with
the cos/sin rows of an offset, odd T, D in {2, 64, 80, 96, 128}.  Then hostile values, bad inputs, the
extension's ops (opcheck, TORCH_CHECKs, torch.compile), and on a GPU the low-precision rule.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from kernels import backends, reference

try:
    import triton

    from kernels import fused_rope, fused_swiglu
except ImportError:  # no triton: its cases skip (unavailable_reason says why)
    triton = fused_rope = fused_swiglu = None

CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "pytorch", "triton", "cuda"]
# the GPU case is named "gpu", not "cuda": bench/gpu_check.py sends tests with a "cuda" parameter to the
# extension's step (after its build), and only the "cuda" backend's cases need the extension
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="gpu")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]

# dtype -> (atol, rtol) against the reference on the same inputs.  Ours and the reference both compute in
# fp32 and round once, so they agree to ~1 ulp; "pytorch" computes in the input dtype (several roundings).
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
TOL_PYTORCH = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (1.5e-2, 1e-2),
               torch.bfloat16: (1e-1, 5e-2)}


def _need(backend: str, op: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    reason = backends.unavailable_reason(backend, op, torch.device(device))
    if reason:
        pytest.skip(reason)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 (this case runs on a GPU)")


def _on(backend: str, op: str):
    fn = getattr(kernels, op)

    def run(*args):
        with kernels.backend(backend):
            return fn(*args)
    return run


def _close(ours, ref, dtype, what, tol=TOL, equal_nan=False):
    atol, rtol = tol[dtype]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, \
        f"{what}: {ours.dtype}{tuple(ours.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")


def _angles(n_pos: int, D: int, theta: float = 10000.0, device="cpu") -> torch.Tensor:
    """(n_pos, D/2) fp32 rotation angles of positions 0..n_pos-1, as llm/rope.py makes them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    return (torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]).to(device)


# ------------------------------------------------------------------ the reference, independently


def _rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication in fp64: plane i is z_i = x1_i + i x2_i, turned by e^{i theta}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # (B, H, T, D/2)
    w = torch.complex(cos.double(), sin.double())  # (T, D/2): e^{i theta} = cos + i sin
    r = z * w
    return torch.cat([r.real, r.imag], dim=-1)  # (B, H, T, D)


@pytest.mark.parametrize("D", [2, 64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_rope_is_a_complex_rotation(D, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ang = _angles(40, D)[31:]  # positions 31..39
    cos, sin = ang.cos(), ang.sin()
    y = reference.rope(x, cos, sin)
    want = _rope_complex(x.detach(), cos, sin)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
    # the VJP of a rotation is the rotation back: dz * e^{-i theta}
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx.double(), _rope_complex(dy, cos, -sin), atol=tol, rtol=tol)


def test_reference_rope_composes_angles_and_keeps_relative_positions():
    """R(a) R(b) = R(a + b); and q . k after RoPE depends only on how far apart the two positions are."""
    g = torch.Generator().manual_seed(1)
    D = 64
    x = torch.randn(1, 2, 5, D, generator=g, dtype=torch.float64)
    a, b = torch.rand(5, D // 2, generator=g) * 6, torch.rand(5, D // 2, generator=g) * 6
    twice = reference.rope(reference.rope(x, a.cos(), a.sin()), b.cos(), b.sin())
    torch.testing.assert_close(twice, reference.rope(x, (a + b).cos(), (a + b).sin()), atol=1e-6, rtol=1e-6)
    ang = _angles(64, D).double()
    q, k = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)

    def score(p, s):
        qp = reference.rope(q, ang[p : p + 1].cos().float(), ang[p : p + 1].sin().float())
        ks = reference.rope(k, ang[s : s + 1].cos().float(), ang[s : s + 1].sin().float())
        return (qp * ks).sum().item()
    assert score(10, 3) == pytest.approx(score(50, 43), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_swiglu_against_fp64(dtype):
    g = torch.Generator().manual_seed(2)
    gate = (4 * torch.randn(7, 300, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    up = torch.randn(7, 300, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = reference.swiglu(gate, up)
    g64, u64 = gate.detach().double(), up.detach().double()
    s = 1.0 / (1.0 + torch.exp(-g64))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(y.double(), g64 * s * u64, atol=tol, rtol=tol)
    dy = torch.randn(7, 300, generator=g, dtype=torch.float64).to(dtype)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    d64 = dy.double()
    torch.testing.assert_close(dgate.double(), d64 * u64 * s * (1 + g64 * (1 - s)), atol=tol, rtol=tol)
    torch.testing.assert_close(dup.double(), d64 * g64 * s, atol=tol, rtol=tol)


# ----------------------------------------------------------------------- RoPE, every backend

# (B, H, T, D, layout): x as the model hands it over, and cos/sin as llm/rope.py makes them
ROPE_CASES = [
    (2, 3, 17, 64, "contiguous"),
    (2, 4, 97, 128, "qkv"),  # q = a transposed view of the fused (B, T, 3, H, D) projection
    (2, 2, 33, 80, "gqa-k"),  # k (H_kv heads) from a fused (B, T, H + 2 H_kv, D) projection, H = 3 H_kv
    (1, 4, 1, 128, "decode"),  # T = 1 at position 57: the cos/sin rows of the offset, q from a fused view
    (3, 1, 5, 2, "contiguous"),  # D = 2 (one plane), H = 1
    (1, 2, 7, 96, "offset"),  # rows at an offset, cos/sin the first halves of a (T, D) table: row stride D
    (2, 2, 9, 64, "strided-d"),  # a head dim that is not unit-stride (copied), cos/sin column-strided too
]
ROPE_IDS = [f"{B}x{H}x{T}x{D}-{layout}" for B, H, T, D, layout in ROPE_CASES]


def _rope_inputs(B, H, T, D, layout, dtype, device, seed=0, scale=1.0):
    """x (a leaf, in the case's layout), cos, sin (T, D/2) float32, and an incoming gradient dy."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: (scale * torch.randn(*s, generator=g)).to(dtype)  # noqa: E731
    offset = {"decode": 57, "offset": 11}.get(layout, 0)
    table = _angles(offset + T + 3, D)  # (positions, D/2)
    cos, sin = table.cos()[offset : offset + T], table.sin()[offset : offset + T]
    if layout in ("qkv", "decode"):
        x = randn(B, T, 3, H, D)[:, :, 0].transpose(1, 2)  # (B, H, T, D) view, strides (T*3HD, D, 3HD, 1)
    elif layout == "gqa-k":
        x = randn(B, T, 3 * H + 2 * H, D)[:, :, 3 * H : 4 * H].transpose(1, 2)  # k of the fused projection
    elif layout == "strided-d":
        x = randn(B, H, D, T).transpose(-1, -2)  # stride 1 along T, T along D
        cos, sin = cos.t().contiguous().t(), sin.t().contiguous().t()  # column stride T
    else:
        x = randn(B, H, T, D)
    if layout == "offset":
        full = torch.cat([table, table], dim=-1)  # (positions, D): Hugging Face's duplicated layout
        cos, sin = full.cos()[offset : offset + T, : D // 2], full.sin()[offset : offset + T, : D // 2]
    assert cos.shape == (T, D // 2) and x.shape == (B, H, T, D)
    dy = randn(B, H, T, D)
    return x.to(device).detach().requires_grad_(), cos.to(device), sin.to(device), dy.to(device)


def _check_rope(backend, case, dtype, device):
    _need(backend, "rope", device, dtype)
    x, cos, sin, dy = _rope_inputs(*case, dtype, device)
    y = _on(backend, "rope")(x, cos, sin)
    y_ref = reference.rope(x, cos, sin)
    tol = TOL_PYTORCH if backend == "pytorch" else TOL
    _close(y, y_ref, dtype, f"{backend} y", tol)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    _close(dx, dx_ref, dtype, f"{backend} dx", tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=ROPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_matches_reference(backend, case, dtype, device):
    _check_rope(backend, case, dtype, device)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rope_gives_cos_and_sin_no_gradient(backend):
    """cos and sin are a fixed table of angles: our kernels return no gradient for them, even when they
    require one (the reference, plain autograd, would give one)."""
    _need(backend, "rope", "cpu")
    x, cos, sin, dy = _rope_inputs(1, 2, 5, 8, "contiguous", torch.float32, "cpu")
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    y = _on(backend, "rope")(x, cos, sin)
    dx, dcos, dsin = torch.autograd.grad(y, (x, cos, sin), dy, allow_unused=True)
    assert dcos is None and dsin is None
    _close(dx, torch.autograd.grad(reference.rope(x, cos, sin), x, dy)[0], torch.float32, "dx")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rope_output_is_contiguous_and_q_k_share_the_angles(backend):
    """The model turns q and k (different head counts, both views of one projection) with the same cos/sin."""
    _need(backend, "rope", "cpu")
    B, T, H, Hkv, D = 2, 6, 4, 2, 16
    qkv = torch.randn(B, T, H + 2 * Hkv, D)
    q, k = qkv[:, :, :H].transpose(1, 2), qkv[:, :, H : H + Hkv].transpose(1, 2)
    ang = _angles(T, D)
    cos, sin = ang.cos(), ang.sin()
    for t in (q, k):
        y = _on(backend, "rope")(t, cos, sin)
        assert y.is_contiguous() and y.shape == t.shape
        _close(y, reference.rope(t, cos, sin), torch.float32, "y")


# --------------------------------------------------------------------- SwiGLU, every backend

# (shape, layout): gate and up as the model hands them over
SWIGLU_CASES = [
    ((7,), "contiguous"),
    ((3, 5), "contiguous"),
    ((2, 17, 96), "fused"),  # gate, up = h.chunk(2, -1) of one (B, T, 2I) projection: row stride 2I
    ((4, 1000), "contiguous"),
    ((1, 3, 4097), "fused"),  # ragged: neither half a multiple of any vector width
    ((6, 40), "transposed"),  # last dim not unit-stride (copied)
    ((5, 33), "mixed"),  # gate contiguous, up a slice of a wider tensor
]
SWIGLU_IDS = ["x".join(map(str, s)) + f"-{layout}" for s, layout in SWIGLU_CASES]


def _swiglu_inputs(shape, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if layout == "fused":
        h = randn(*shape[:-1], 2 * shape[-1]) * torch.cat([torch.full((shape[-1],), 3.0), torch.ones(shape[-1])])
        gate, up = h.to(dtype).chunk(2, dim=-1)
    elif layout == "transposed":
        gate, up = (3 * randn(*shape[::-1])).to(dtype).t(), randn(*shape[::-1]).to(dtype).t()
    elif layout == "mixed":
        gate, up = (3 * randn(*shape)).to(dtype), randn(shape[0], shape[1] + 7).to(dtype)[:, 3 : 3 + shape[1]]
    else:
        gate, up = (3 * randn(*shape)).to(dtype), randn(*shape).to(dtype)
    dy = randn(*shape).to(dtype)
    assert gate.shape == up.shape == shape
    return gate.to(device).detach().requires_grad_(), up.to(device).detach().requires_grad_(), dy.to(device)


def _check_swiglu(backend, case, dtype, device):
    _need(backend, "swiglu", device, dtype)
    gate, up, dy = _swiglu_inputs(*case, dtype, device)
    y = _on(backend, "swiglu")(gate, up)
    y_ref = reference.swiglu(gate, up)
    tol = TOL_PYTORCH if backend == "pytorch" else TOL
    _close(y, y_ref, dtype, f"{backend} y", tol)
    grads = torch.autograd.grad(y, (gate, up), dy)
    grads_ref = torch.autograd.grad(y_ref, (gate, up), dy)
    for name, a, b in zip(("dgate", "dup"), grads, grads_ref):
        _close(a, b, dtype, f"{backend} {name}", tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SWIGLU_CASES, ids=SWIGLU_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_matches_reference(backend, case, dtype, device):
    _check_swiglu(backend, case, dtype, device)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_swiglu_fp64_and_one_input_needing_grad(backend):
    _need(backend, "swiglu", "cpu")
    gate, up, dy = _swiglu_inputs((3, 50), "fused", torch.float64, "cpu")
    y = _on(backend, "swiglu")(gate, up)
    _close(y, reference.swiglu(gate, up), torch.float64, "fp64 y")
    for leaf in (gate, up):
        (got,) = torch.autograd.grad(_on(backend, "swiglu")(gate, up), leaf, dy)
        (want,) = torch.autograd.grad(reference.swiglu(gate, up), leaf, dy)
        _close(got, want, torch.float64, "fp64 grad")
    y.sum().backward()  # an expanded (stride 0) incoming gradient
    want = torch.autograd.grad(reference.swiglu(gate, up).sum(), (gate, up))
    _close(gate.grad, want[0], torch.float64, "dgate from sum()")
    _close(up.grad, want[1], torch.float64, "dup from sum()")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rope_fp64_and_a_strided_incoming_gradient(backend):
    _need(backend, "rope", "cpu")
    x, cos, sin, _ = _rope_inputs(2, 3, 5, 16, "qkv", torch.float64, "cpu")
    y = _on(backend, "rope")(x, cos, sin)
    _close(y, reference.rope(x, cos, sin), torch.float64, "fp64 y")
    dy = torch.randn(2, 5, 3, 16, dtype=torch.float64).transpose(1, 2)  # not contiguous
    _close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(reference.rope(x, cos, sin), x, dy)[0],
           torch.float64, "fp64 dx")


# ----------------------------------------------------------------------------- hostile values

HOSTILE_BACKENDS = ["torch", "triton", "cuda"]  # ours and the reference ("pytorch" computes in the input dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", HOSTILE_BACKENDS + ["pytorch"])
def test_rope_large_magnitudes(backend, dtype):
    """Entries near the dtype's largest finite value: y (up to sqrt(2) |x|) overflows where the reference's does."""
    if backend == "pytorch" and dtype == torch.float16:
        pytest.skip("PyTorch's own RoPE computes in fp16: its intermediates overflow where fp32 math does not")
    _need(backend, "rope", "cpu")
    big = {torch.float32: 3e38, torch.float16: 6e4}[dtype]
    D = 16
    x, cos, sin, dy = _rope_inputs(1, 2, 9, D, "qkv", dtype, "cpu", scale=big / 8)
    x, dy = x.detach().clone(), dy.clone()
    # plane 0 turns by 1 radian per position: at position 1, x1 = x2 = big gives y2 = big (cos 1 + sin 1) =
    # 1.38 big, past the largest finite value; the incoming gradient likewise overflows dx1
    x[:, :, 1, 0] = x[:, :, 1, D // 2] = big
    dy[:, :, 1, 0] = dy[:, :, 1, D // 2] = big
    x.requires_grad_()
    y, y_ref = _on(backend, "rope")(x, cos, sin), reference.rope(x, cos, sin)
    assert not torch.isfinite(y_ref).all() and torch.isfinite(y_ref).any()  # the case does overflow somewhere
    # x1*cos - x2*sin cancels: the rounding error is relative to the terms (~big), not to the result
    tol = {dtype: (TOL[dtype][0] * big, TOL[dtype][1])}
    _close(y, y_ref, dtype, "y", tol, equal_nan=True)
    dx_ref = torch.autograd.grad(y_ref, x, dy)[0]
    assert not torch.isfinite(dx_ref).all()
    _close(torch.autograd.grad(y, x, dy)[0], dx_ref, dtype, "dx", tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", HOSTILE_BACKENDS)
def test_rope_non_finite_values_propagate_like_the_reference(backend, dtype):
    """inf and NaN go through the same IEEE arithmetic: inf * sin(0) = NaN at position 0, ±inf elsewhere."""
    _need(backend, "rope", "cpu")
    x, cos, sin, dy = _rope_inputs(1, 2, 6, 16, "qkv", dtype, "cpu")
    x = x.detach().clone()
    x[0, 0, 0, 3] = float("inf")  # position 0: sin = 0, so its partner becomes NaN
    x[0, 0, 2, 11] = float("-inf")
    x[0, 1, 4, 5] = float("nan")
    x.requires_grad_()
    y, y_ref = _on(backend, "rope")(x, cos, sin), reference.rope(x, cos, sin)
    assert torch.isnan(y_ref).any() and torch.isinf(y_ref).any()
    _close(y, y_ref, dtype, "y", equal_nan=True)
    dy = dy.clone()
    dy[0, 1, 1, 0] = float("inf")
    dy[0, 0, 3, 9] = float("nan")
    _close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0], dtype, "dx", equal_nan=True)


GATE_VALUES = [float("-inf"), -1e4, -100.0, -88.7, -20.0, -1.0, -0.0, 0.0, 1e-3, 1.0, 20.0, 88.7, 100.0, 1e4,
               float("inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", HOSTILE_BACKENDS + ["pytorch"])
def test_swiglu_saturating_and_non_finite_gates(backend, dtype):
    """sigmoid saturates to exactly 0 and 1 without overflow; silu(-inf) = -inf * 0 = NaN and silu(+inf)
    = inf as in the reference; an infinite up times silu(0) = 0 is NaN; gradients likewise."""
    _need(backend, "swiglu", "cpu")
    gv = torch.tensor(GATE_VALUES)
    gate = gv.repeat(3, 1)  # (3, 16)
    up = torch.tensor([[1.5], [-0.25], [3.0]]).expand(3, len(GATE_VALUES)).clone()
    up[1, 7] = float("inf")  # silu(0) * inf = NaN
    up[2, 9] = float("-inf")  # silu(1) * -inf = -inf
    gate, up = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
    y, y_ref = _on(backend, "swiglu")(gate, up), reference.swiglu(gate, up)
    tol = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 2e-3)}
    _close(y, y_ref, dtype, "y", tol, equal_nan=True)
    dy = torch.linspace(-2, 2, y.numel()).reshape(y.shape).to(dtype)
    got = torch.autograd.grad(y, (gate, up), dy)
    want = torch.autograd.grad(y_ref, (gate, up), dy)
    for name, a, b in zip(("dgate", "dup"), got, want):
        # non-finite exactly where the reference's is; but of what kind may differ: at gate = 0 with an
        # infinite up, d silu / d gate = 1/2 makes dgate +-inf here, while the reference's autograd (the
        # product rule of gate * sigmoid(gate)) adds inf * 1/2 and (inf * 0) * 1/4 = NaN
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), \
            f"{name}: non-finite at {(~torch.isfinite(a)).nonzero().tolist()}, reference at {(~finite).nonzero().tolist()}"
        _close(torch.where(finite, a, 0), torch.where(finite, b, 0), dtype, name, tol)


# -------------------------------------------------------------------------------- bad inputs


def _bad_rope_calls():
    x, ang = torch.randn(1, 2, 4, 8), _angles(4, 8)
    cos, sin = ang.cos(), ang.sin()
    return [
        (TypeError, r"rope: x must be a torch\.Tensor", lambda: kernels.rope(x.tolist(), cos, sin)),
        (TypeError, r"rope: x must be a floating-point tensor", lambda: kernels.rope(x.int(), cos, sin)),
        (ValueError, r"rope: x must be a non-empty 4-D \(B, H, T, D\) tensor", lambda: kernels.rope(x[0], cos, sin)),
        (ValueError, r"rope: x must be a non-empty 4-D", lambda: kernels.rope(x[:, :0], cos, sin)),
        (ValueError, r"rope: x's head dim D must be even", lambda: kernels.rope(torch.randn(1, 2, 4, 7), cos, sin)),
        (TypeError, r"rope: cos must be a float32 tensor", lambda: kernels.rope(x, cos.double(), sin)),
        (TypeError, r"rope: sin must be a float32 tensor", lambda: kernels.rope(x, cos, sin.half())),
        (ValueError, r"rope: sin must have shape \(T, D/2\) = \(4, 4\)", lambda: kernels.rope(x, cos, sin[:3])),
        (ValueError, r"rope: cos must have shape \(T, D/2\)", lambda: kernels.rope(x, torch.cat([cos, cos], -1), sin)),
        (ValueError, r"rope: all tensors must be on the same device", lambda: kernels.rope(x, cos.to("meta"), sin)),
    ]


def _bad_swiglu_calls():
    g = torch.randn(3, 5)
    return [
        (TypeError, r"swiglu: up must be a torch\.Tensor", lambda: kernels.swiglu(g, 2.0)),
        (TypeError, r"swiglu: gate must be a floating-point tensor", lambda: kernels.swiglu(g.long(), g)),
        (ValueError, r"swiglu: gate must be a non-empty tensor", lambda: kernels.swiglu(g[:0], g[:0])),
        (ValueError, r"swiglu: gate must be a non-empty tensor", lambda: kernels.swiglu(torch.tensor(1.0), torch.tensor(2.0))),
        (ValueError, r"swiglu: gate and up must have the same shape", lambda: kernels.swiglu(g, g.t())),
        (TypeError, r"swiglu: tensors must share one dtype", lambda: kernels.swiglu(g, g.half())),
        (ValueError, r"swiglu: all tensors must be on the same device", lambda: kernels.swiglu(g, g.to("meta"))),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(10))
def test_bad_rope_inputs_raise_the_api_errors_on_every_backend(backend, case):
    _need(backend, "rope", "cpu")
    exc, pattern, call = _bad_rope_calls()[case]
    with kernels.backend(backend), pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(7))
def test_bad_swiglu_inputs_raise_the_api_errors_on_every_backend(backend, case):
    _need(backend, "swiglu", "cpu")
    exc, pattern, call = _bad_swiglu_calls()[case]
    with kernels.backend(backend), pytest.raises(exc, match=pattern):
        call()


def test_the_triton_backend_dispatches_to_these_modules():
    _need("triton", "rope", "cpu")
    with kernels.backend("triton"):
        assert backends.resolve("rope", torch.device("cpu")) is fused_rope.rope
        assert backends.resolve("swiglu", torch.device("cpu")) is fused_swiglu.swiglu


# --------------------------------------------------------------------- the extension's ops


def _ext():
    reason = backends.unavailable_reason("cuda", "rope", torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    from kernels import _cuda_backend, _cuda_rope_swiglu

    return torch.ops.llm_kernels, _cuda_backend, _cuda_rope_swiglu


def test_cuda_backend_exports_rope_and_swiglu():
    ops, cb, crs = _ext()
    assert not crs.MISSING
    with kernels.backend("cuda"):
        assert backends.resolve("rope", torch.device("cpu")) is cb.rope is crs.rope
        assert backends.resolve("swiglu", torch.device("cpu")) is cb.swiglu is crs.swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_rope(dtype):
    ops, _, _ = _ext()
    for layout in ("contiguous", "qkv", "offset", "strided-d"):
        x, cos, sin, dy = _rope_inputs(2, 3, 5, 16, layout, dtype, "cpu")
        torch.library.opcheck(ops.rope_fwd.default, (x, cos, sin))
        torch.library.opcheck(ops.rope_bwd.default, (dy, cos, sin))
    x, cos, sin, _ = _rope_inputs(1, 1, 1, 2, "contiguous", dtype, "cpu")
    torch.library.opcheck(ops.rope_fwd.default, (x.detach(), cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_swiglu(dtype):
    ops, _, _ = _ext()
    for shape, layout in (((3, 5), "contiguous"), ((2, 4, 24), "fused"), ((6, 8), "transposed"), ((7,), "contiguous")):
        gate, up, dy = _swiglu_inputs(shape, layout, dtype, "cpu")
        torch.library.opcheck(ops.swiglu_fwd.default, (gate, up))
        torch.library.opcheck(ops.swiglu_bwd.default, (dy, gate.detach(), up.detach()))


def test_ops_on_empty_tensors():
    ops, _, _ = _ext()
    ang = _angles(0, 8)
    assert ops.rope_fwd(torch.randn(2, 3, 0, 8), ang.cos(), ang.sin()).shape == (2, 3, 0, 8)
    assert ops.swiglu_fwd(torch.randn(4, 0), torch.randn(4, 0)).shape == (4, 0)
    dg, du = ops.swiglu_bwd(torch.randn(0, 3), torch.randn(0, 3), torch.randn(0, 3))
    assert dg.shape == du.shape == (0, 3)


def _bad_op_calls(ops):
    x, ang = torch.randn(1, 2, 4, 8), _angles(4, 8)
    cos, sin = ang.cos(), ang.sin()
    g = torch.randn(3, 5)
    return [
        ("rope_fwd: x must be 4-D", lambda: ops.rope_fwd(x[0], cos, sin)),
        ("rope_fwd: x must be float32, float64, float16 or bfloat16", lambda: ops.rope_fwd(x.int(), cos, sin)),
        ("rope_fwd: x's head dim D must be even", lambda: ops.rope_fwd(torch.randn(1, 2, 4, 7), cos, sin)),
        ("rope_fwd: cos must be float32 with shape", lambda: ops.rope_fwd(x, cos.double(), sin)),
        ("rope_fwd: sin must be float32 with shape", lambda: ops.rope_fwd(x, cos, sin[:, :3])),
        ("rope_bwd: dy must be 4-D", lambda: ops.rope_bwd(torch.randn(4, 8), cos, sin)),
        ("rope_bwd: cos must be float32 with shape", lambda: ops.rope_bwd(x, cos[:2], sin)),
        ("swiglu_fwd: up must match gate", lambda: ops.swiglu_fwd(g, g.t())),
        ("swiglu_fwd: up must match gate", lambda: ops.swiglu_fwd(g, g.double())),
        ("swiglu_fwd: gate must be float32", lambda: ops.swiglu_fwd(g.long(), g.long())),
        ("swiglu_bwd: dy must match gate", lambda: ops.swiglu_bwd(g.half(), g, g)),
        ("swiglu_bwd: up must match gate", lambda: ops.swiglu_bwd(g, g, g[:2])),
    ]


@pytest.mark.parametrize("case", range(12))
def test_op_bad_inputs_raise_naming_the_tensor(case):
    ops, _, _ = _ext()
    pattern, call = _bad_op_calls(ops)[case]
    with pytest.raises(RuntimeError, match=pattern) as info:
        call()
    assert "shape" in str(info.value) and "dtype" in str(info.value), str(info.value)


def test_torch_compile_fullgraph_traces_the_ops():
    """register_fake + register_autograd: the model's use of both ops traces into one graph, forward and backward."""
    _ext()
    torch._dynamo.reset()
    B, T, H, D, I = 2, 5, 2, 16, 24

    def f(qkv, h, cos, sin):
        q = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D) views, as the model makes them
        k = qkv[:, :, 1].transpose(1, 2)
        gate, up = h.chunk(2, dim=-1)
        return (kernels.rope(q, cos, sin) * kernels.rope(k, cos, sin)).sum() + kernels.swiglu(gate, up).square().sum()

    qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
    h = torch.randn(B, T, 2 * I, requires_grad=True)
    ang = _angles(T + 4, D)[4:]
    cos, sin = ang.cos(), ang.sin()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with kernels.backend("cuda"):
        out = compiled(qkv, h, cos, sin)
    grads = torch.autograd.grad(out, (qkv, h))
    with kernels.backend("torch"):
        ref = f(qkv, h, cos, sin)
    grads_ref = torch.autograd.grad(ref, (qkv, h))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# No GPU here: a fake device capability and compiled targets (the CUDA tensors are FakeTensors).
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    def make(capability, archs):
        _, cb, _ = _ext()
        monkeypatch.setattr(cb, "_device_capability", lambda device: capability)
        monkeypatch.setattr(cb, "_compiled_archs", lambda: archs)
        monkeypatch.setattr(cb, "_gpu_reasons", {})
    return make


def test_a_library_without_cuda_code_says_so_before_launching(fake_gpu):
    fake_gpu((9, 0), "")
    with FakeTensorMode(), kernels.backend("cuda"):
        x = torch.empty(1, 2, 4, 8, device="cuda", dtype=torch.bfloat16)
        cos = torch.empty(4, 4, device="cuda")
        with pytest.raises(backends.BackendUnavailableError, match="built without its CUDA kernels"):
            kernels.rope(x, cos, cos)
        with pytest.raises(backends.BackendUnavailableError, match="built without its CUDA kernels"):
            kernels.swiglu(x, x)
    fake_gpu((9, 0), "sm_80,sm_90")  # a library that holds code for the GPU: the ops trace to their fakes
    with FakeTensorMode(), kernels.backend("cuda"):
        x = torch.empty(1, 2, 4, 8, device="cuda", dtype=torch.bfloat16)
        cos = torch.empty(4, 4, device="cuda")
        assert kernels.rope(x, cos, cos).shape == (1, 2, 4, 8)
        assert kernels.swiglu(x, x).shape == (1, 2, 4, 8)


def test_cpu_tensors_never_ask_for_a_gpu(monkeypatch):
    _, cb, _ = _ext()

    def no_gpu(device):
        raise AssertionError("the capability of a GPU was asked for with CPU tensors")

    monkeypatch.setattr(cb, "_device_capability", no_gpu)
    x, cos, sin, _ = _rope_inputs(1, 2, 3, 8, "contiguous", torch.float32, "cpu")
    with kernels.backend("cuda"):
        kernels.rope(x, cos, sin)
        kernels.swiglu(x, x)


def test_a_library_older_than_the_ops_asks_for_a_rebuild(monkeypatch):
    _, _, crs = _ext()
    monkeypatch.setattr(crs, "MISSING", ["rope_fwd", "rope_bwd"])
    x, cos, sin, _ = _rope_inputs(1, 2, 3, 8, "contiguous", torch.float32, "cpu")
    with kernels.backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="rebuild it"):
        kernels.rope(x, cos, sin)


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["cuda"])
def test_gpu_cuda_kernels_vector_and_scalar_paths(backend, dtype):
    """16-byte loads where D/2, the strides and the pointers allow; the scalar kernel on an unaligned view."""
    ops, _, _ = _ext()
    B, H, T, D = 2, 4, 129, 128
    base = torch.randn(B, T, 3 * H * D + 1, device="cuda").to(dtype)
    for x in (base[..., : H * D].view(B, T, H, D).transpose(1, 2),  # aligned: vector path
              base[..., 1 : 1 + H * D].view(B, T, H, D).transpose(1, 2)):  # offset by one element: scalar path
        ang = _angles(T, D, device="cuda")
        y = ops.rope_fwd(x, ang.cos(), ang.sin())
        _close(y, reference.rope(x, ang.cos(), ang.sin()), dtype, "rope y")
    h = torch.randn(3, 7, 2 * 1000 + 1, device="cuda").to(dtype)
    for gate, up in ((h[..., :1000], h[..., 1000:2000]), (h[..., 1:1001], h[..., 1001:2001])):
        _close(ops.swiglu_fwd(gate, up), reference.swiglu(gate, up), dtype, "swiglu y")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_int64_offsets(backend):
    """More than 2**31 elements: the flat offsets must be int64 in every kernel."""
    _need(backend, "swiglu", "cuda", torch.bfloat16)
    n = 2**31 + 4096
    if torch.cuda.mem_get_info()[0] < 4 * n * 2 + (2 << 30):
        pytest.skip("not enough free GPU memory for > 2**31-element tensors")
    gate = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    up = torch.ones_like(gate)
    tail = slice(n - 4096, n)
    y = _on(backend, "swiglu")(gate, up)
    _close(y[tail], reference.swiglu(gate[tail], up[tail]), torch.bfloat16, f"{backend} swiglu tail")
    del y, up
    D, T = 128, 4096
    x = gate.view(-1)[: (n // (T * D)) * T * D].view(-1, 1, T, D)  # B*H*T*D >= 2**31
    ang = _angles(T, D, device="cuda")
    y = _on(backend, "rope")(x, ang.cos(), ang.sin())
    _close(y[-1:], reference.rope(x[-1:], ang.cos(), ang.sin()), torch.bfloat16, f"{backend} rope tail")


# --------------------------------------- low precision: within 2x PyTorch's own error (tests/test_lowp.py)

LOWP = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times the reference's largest magnitude
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _lowp_need(lowp, backend, op, dtype):
    lowp.start(backend, op, dtype)
    _need(backend, op, DEVICE.type, dtype)


def _value_and_grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad)]


@pytest.mark.gpu
@pytest.mark.dry_run
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,H,T,D", [(8, 32, 1024, 128), (8, 8, 1024, 64), (64, 32, 1, 128), (4, 16, 999, 80)]
                         if CUDA else [(1, 2, 33, 64), (1, 2, 1, 80)])
def test_lowp_rope(lowp, backend, B, H, T, D, dtype):
    _lowp_need(lowp, backend, "rope", dtype)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, generator=g).to(dtype)
    q = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D) view, as the model calls it
    dy = torch.randn(B, H, T, D, device=DEVICE, generator=g).to(dtype)
    ang = _angles(T + 100, D, device=DEVICE)[100:]
    cos, sin = ang.cos(), ang.sin()
    ours = _value_and_grads(lambda x: _on(backend, "rope")(x, cos, sin), (q,), dy)
    with kernels.backend("pytorch"):
        theirs = _value_and_grads(lambda x: kernels.rope(x, cos, sin), (q,), dy)
    exact = _value_and_grads(lambda x: reference.rope(x, cos, sin), (q.float(),), dy.float())
    assert ours[0].dtype == ours[1].dtype == dtype
    lowp.compare({n: (o, t, e) for n, o, t, e in zip(("y", "dx"), ours, theirs, exact)}, atol=ATOL[dtype])


@pytest.mark.gpu
@pytest.mark.dry_run
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(8, 1024, 3072), (4, 1000, 2816), (1, 8192)] if CUDA else [(2, 7, 96), (3, 50)])
def test_lowp_swiglu(lowp, backend, shape, dtype):
    _lowp_need(lowp, backend, "swiglu", dtype)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    h = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, generator=g).mul(2).to(dtype)
    gate, up = h.chunk(2, dim=-1)  # the two halves of the fused projection, as the model calls it
    dy = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    inputs = (gate, up)
    ours = _value_and_grads(_on(backend, "swiglu"), inputs, dy)
    theirs = _value_and_grads(lambda a, b: F.silu(a) * b, inputs, dy)
    exact = _value_and_grads(reference.swiglu, [t.float() for t in inputs], dy.float())
    assert all(t.dtype == dtype for t in ours)
    lowp.compare({n: (o, t, e) for n, o, t, e in zip(("y", "dgate", "dup"), ours, theirs, exact)}, atol=ATOL[dtype])


def test_the_lowp_bound_is_meaningful_here():
    """Sanity of the rule's inputs on the CPU: PyTorch's own fp16 RoPE does make an error to compare against."""
    x, cos, sin, _ = _rope_inputs(1, 2, 33, 64, "qkv", torch.float16, "cpu")
    with kernels.backend("pytorch"):
        theirs = kernels.rope(x, cos, sin)
    exact = reference.rope(x.float(), cos, sin)
    assert 0 < (theirs.float() - exact).abs().max().item() < 1e-2
    assert math.isfinite((reference.rope(x, cos, sin).float() - exact).abs().max().item())
