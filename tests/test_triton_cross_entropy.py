"""The Triton cross-entropy and linear-cross-entropy kernels against ``kernels.reference``.

On a machine without CUDA they run through Triton's interpreter (TRITON_INTERPRET=1, set below
before triton is imported); bf16 is only meaningful on a GPU, so it is tested under ``gpu``.
"""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import backends, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported triton, so the
# kernels below run in Triton's interpreter on the CPU.
triton = pytest.importorskip("triton")
from kernels import fused_cross_entropy as fce  # noqa: E402

if DEVICE == "cpu":
    assert fce.INTERPRET, "no CUDA and the Triton kernels are not interpreted: run pytest from the repo (tests/conftest.py)"


TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


def _targets(shape, V, ignore_every=0, dtype=torch.int64, gen=None):
    y = torch.randint(0, V, shape, generator=gen, dtype=torch.int64)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    return y.to(dtype).to(DEVICE)


def _ce_and_grads(fn, logits, targets, grad_scale=2.5, **kw):
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, targets, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), z.grad


# --------------------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, ignore_every, tdtype",
    [((5, 7), 2, torch.int64), ((2, 3, 7), 4, torch.int32), ((3, 50257), 3, torch.int64), ((4, 50257), 0, torch.int32)],
)
def test_cross_entropy_matches_reference(shape, ignore_every, tdtype, dtype):
    gen = torch.Generator().manual_seed(0)
    V = shape[-1]
    logits = (torch.randn(shape, generator=gen) * 4).to(dtype).to(DEVICE)
    y = _targets(shape[:-1], V, ignore_every, tdtype, gen)
    loss, grad = _ce_and_grads(fce.cross_entropy, logits, y)
    ref_loss, ref_grad = _ce_and_grads(reference.cross_entropy, logits, y)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32 if dtype == torch.float32 else torch.float16])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    if ignore_every:  # ignored rows get exactly zero gradient
        ignored = (y == -100).cpu()
        assert ignored.any() and torch.all(grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("V", [7, 50257])
def test_cross_entropy_all_ignored_is_zero_with_zero_grad(V):
    logits = torch.randn(3, V, device=DEVICE)
    y = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    loss, grad = _ce_and_grads(fce.cross_entropy, logits, y, ignore_index=-1)
    assert loss.item() == 0.0 and torch.all(grad == 0) and not torch.isnan(grad).any()
    assert reference.cross_entropy(logits, y, -1).item() == 0.0


def test_cross_entropy_never_touches_the_callers_logits_and_survives_retain_graph():
    logits = torch.randn(6, 33, device=DEVICE, requires_grad=True)
    before = logits.detach().clone()
    y = _targets((6,), 33, 2)
    loss = fce.cross_entropy(logits, y)
    loss.backward(retain_graph=True)
    g1 = logits.grad.clone()
    (loss * 3).backward()  # the stored gradient must not have been scaled in place by the first call
    torch.testing.assert_close(logits.grad, 4 * g1)
    assert torch.equal(logits.detach(), before)


def test_cross_entropy_no_grad_path_and_non_contiguous_logits():
    base = torch.randn(40, 10, device=DEVICE)
    logits = base.t()[:, :37]  # (10, 37) with vocab stride 10
    y = _targets((10,), 37, 3)
    with torch.no_grad():
        loss = fce.cross_entropy(logits, y)
    torch.testing.assert_close(loss, reference.cross_entropy(logits, y), **TOL[torch.float32])
    _, grad = _ce_and_grads(fce.cross_entropy, logits, y)
    _, ref_grad = _ce_and_grads(reference.cross_entropy, logits, y)
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32])


def test_internal_inplace_option_writes_the_gradient_over_the_logits():
    logits = torch.randn(4, 300, device=DEVICE)
    y = _targets((4,), 300, 3)
    _, expected = fce._ce_forward(logits, y, -100, torch.ones((), device=DEVICE), inplace=False)
    work = logits.clone()
    losses, grad = fce._ce_forward(work, y, -100, torch.ones((), device=DEVICE), inplace=True)
    assert grad.data_ptr() == work.data_ptr()
    torch.testing.assert_close(work, expected)
    assert torch.all(losses.cpu()[(y == -100).cpu()] == 0)


def test_float64_falls_back_to_the_reference():
    logits = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    y = _targets((3,), 5)
    assert fce.cross_entropy(logits, y).dtype == torch.float64


# --------------------------------------------------------------------------- linear_cross_entropy


def _lce_and_grads(fn, hidden, weight, targets, grad_scale=2.5, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def test_weight_grad_is_accumulated_in_place_in_fp32():
    """Each chunk's dlogits^T @ h goes straight into the fp32 grad_w (torch.addmm with out_dtype and
    out=grad_w, on CUDA and meta), with no (V, C) fp32 temporary per chunk; the CPU, which lacks that
    op, falls back to a rounded product summed in fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels import _chunked_linear_ce as chunked

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    V, C, N = 50257, 768, 667
    grad_w = torch.zeros(V, C, device="meta")
    dlogits = torch.empty(N, V, dtype=torch.bfloat16, device="meta")
    h = torch.empty(N, C, dtype=torch.bfloat16, device="meta")
    with Record() as rec:
        chunked._add_weight_grad(grad_w, dlogits, h)
    assert "aten.addmm.dtype_out" in rec.ops, rec.ops
    assert not any(op.startswith(("aten.mm", "aten.add.", "aten.add_")) for op in rec.ops), rec.ops
    # the CPU path: same sum, the product rounded to bf16 first
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(5, 3, generator=g)
    d, x = torch.randn(4, 5, generator=g).bfloat16(), torch.randn(4, 3, generator=g).bfloat16()
    want = acc + (d.t() @ x).float()
    chunked._add_weight_grad(acc, d, x)
    torch.testing.assert_close(acc, want)
    assert chunked._ADDMM_OUT_DTYPE["cpu"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead, chunk_rows", [((11,), 4), ((2, 5), 3), ((7,), 1), ((9,), None)])
def test_linear_cross_entropy_matches_reference(lead, chunk_rows, dtype):
    gen = torch.Generator().manual_seed(1)
    C, V = 24, 77
    hidden = torch.randn(*lead, C, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(V, C, generator=gen) * 0.3).to(dtype).to(DEVICE)
    y = _targets(lead, V, 3, gen=gen)
    loss, dh, dw = _lce_and_grads(fce.linear_cross_entropy_chunked, hidden, weight, y, chunk_rows=chunk_rows)
    ref_loss, ref_dh, ref_dw = _lce_and_grads(reference.linear_cross_entropy, hidden, weight, y)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    tol = TOL[dtype] if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(dh, ref_dh, **tol)
    torch.testing.assert_close(dw, ref_dw, **tol)


def test_linear_cross_entropy_all_ignored_and_only_weight_grad():
    hidden = torch.randn(5, 8, device=DEVICE)
    weight = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    y = torch.full((5,), -100, dtype=torch.int64, device=DEVICE)
    loss = fce.linear_cross_entropy_chunked(hidden, weight, y, chunk_rows=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(weight.grad == 0)
    y = _targets((5,), 13, 2)  # hidden needs no grad: only dweight is formed
    weight.grad = None
    fce.linear_cross_entropy_chunked(hidden, weight, y, chunk_rows=2).backward()
    w2 = weight.detach().clone().requires_grad_()
    reference.linear_cross_entropy(hidden, w2, y).backward()
    torch.testing.assert_close(weight.grad, w2.grad, **TOL[torch.float32])


def test_linear_cross_entropy_gradient_accumulation():
    gen = torch.Generator().manual_seed(2)
    C, V = 16, 50
    weight = torch.randn(V, C, generator=gen).to(DEVICE)
    batches = [(torch.randn(n, C, generator=gen).to(DEVICE), _targets((n,), V, k, gen=gen)) for n, k in ((7, 2), (5, 3))]

    def accumulate(fn, **kw):
        w = weight.clone().requires_grad_()
        hs = [h.clone().requires_grad_() for h, _ in batches]
        for h, (_, y) in zip(hs, batches):
            (fn(h, w, y, **kw) / len(batches)).backward()
        return w.grad, [h.grad for h in hs]

    dw, dhs = accumulate(fce.linear_cross_entropy_chunked, chunk_rows=2)
    ref_dw, ref_dhs = accumulate(reference.linear_cross_entropy)
    torch.testing.assert_close(dw, ref_dw, **TOL[torch.float32])
    for dh, ref_dh in zip(dhs, ref_dhs):
        torch.testing.assert_close(dh, ref_dh, **TOL[torch.float32])


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast")
def test_linear_cross_entropy_ignores_autocast_like_the_reference():
    # The op computes in its inputs' dtype on every backend; casting for autocast is the model's job.
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(6, 16, generator=gen), torch.randn(40, 16, generator=gen) * 0.3
    y = _targets((6,), 40, 3, gen=gen)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = _lce_and_grads(fce.linear_cross_entropy_chunked, hidden, weight, y, chunk_rows=4)
    ref = _lce_and_grads(reference.linear_cross_entropy, hidden, weight, y)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL[torch.float32])


class _LargestAllocation(TorchDispatchMode):
    """Records the bytes of every tensor an aten op produces (bytes, since the interpreter re-views
    argument storages as uint8)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
                self.shapes.append(tuple(t.shape))
        return out


def test_linear_cross_entropy_memory_scales_with_the_chunk_not_n():
    N, C, V, rows = 64, 8, 300, 5
    hidden = torch.randn(N, C, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, C, device=DEVICE, requires_grad=True)
    y = _targets((N,), V, 4)
    with _LargestAllocation() as mode:
        loss = fce.linear_cross_entropy_chunked(hidden, weight, y, chunk_rows=rows)
        loss.backward()
    assert (N, V) not in mode.shapes
    assert mode.largest <= 4 * max(rows * V, V * C, N * C), (mode.largest, sorted(set(mode.shapes)))
    assert (rows, V) in mode.shapes
    # the default chunk depends on V only: at most _CHUNK_ELEMS logits whatever the token count
    for n in (10**4, 10**6):
        assert fce._chunk_rows(n, 50257, None) == fce._CHUNK_ELEMS // 50257
    assert fce._chunk_rows(3, 50257, None) == 3 and fce._chunk_rows(10, 10**9, None) == 1


# --------------------------------------------------------------------------- dispatch


def test_dispatch_through_the_triton_backend():
    reason = backends.unavailable_reason("triton", "cross_entropy", torch.device(DEVICE))
    if reason and "fused_cross_entropy" not in reason and any(
        s in reason for s in ("flash_attention", "fused_layernorm")
    ):
        pytest.skip(f"triton backend incomplete (a sibling module): {reason}")
    assert reason is None, reason
    logits = torch.randn(4, 9, device=DEVICE)
    y = _targets((4,), 9, 2)
    hidden, weight = torch.randn(4, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE)
    with kernels.backend("triton"):
        assert backends.resolve("cross_entropy", logits.device) is fce.cross_entropy
        assert backends.resolve("linear_cross_entropy", logits.device) is fce.linear_cross_entropy
        loss = kernels.cross_entropy(logits, y)
        lloss = kernels.linear_cross_entropy(hidden, weight, y)
    torch.testing.assert_close(loss, reference.cross_entropy(logits, y), **TOL[torch.float32])
    torch.testing.assert_close(lloss, reference.linear_cross_entropy(hidden, weight, y), **TOL[torch.float32])


_AOT = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import fused_cross_entropy as fce
assert type(fce._ce_kernel).__name__ == "JITFunction"
for z, y, write in (("*bf16", "*i64", True), ("*fp16", "*i32", True), ("*fp32", "*i64", False)):
    sig = dict(z_ptr=z, z_stride="i64", y_ptr=y, g_ptr=z, g_stride="i64", loss_ptr="*fp32", scale_ptr="*fp32",
               V="i32", ignore_index="i32", BLOCK_V="constexpr", WRITE_GRAD="constexpr")
    src = ASTSource(fn=fce._ce_kernel, signature=sig, constexprs=dict(BLOCK_V=4096, WRITE_GRAD=write))
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16))
    except Exception as exc:
        if "ptxas" in str(exc).lower():
            sys.exit(3)
        raise
    assert out.asm["cubin"]
"""


def test_kernel_compiles_for_an_h100_without_a_gpu(tmp_path):
    """What the interpreter cannot check: the real compiler (to sm_90 PTX and cubin) accepts the kernel."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode == 3:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_gpu_linear_cross_entropy_peak_memory_is_below_the_logits():
    N, C, V = 16384, 768, 50257
    hidden = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, C, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fce.linear_cross_entropy(hidden, weight, y).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = N * V * 2
    assert extra < logits_bytes / 2, (extra, logits_bytes)
