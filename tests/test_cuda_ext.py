"""The C++/CUDA extension ``kernels._C``: op registration, the C++ CPU kernels, the CUDA kernels (GPU).

Skipped as a whole only when ``kernels._C`` cannot be imported (not built); CI builds it with
``pip install -e . --no-build-isolation``.  On a machine without a GPU the CPU kernels run every
test here except those marked ``gpu``.
"""
import re
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("kernels._C", reason="kernels._C is not built; run `pip install -e . --no-build-isolation`")

import kernels
from kernels import _cuda_backend, backends, reference

ops = torch.ops.llm_kernels

# dtype -> (atol, rtol).  Both sides accumulate in fp32 (fp64) and round once on store, so the
# low-precision results agree to ~1-2 ulp of the output.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
WIDTHS = [1, 768, 1000, 4096]
ROWS = [1, 7, 33]


def _inputs(shape, dtype, param_dtype=None, device="cpu", seed=0):
    """x with a nonzero mean (exercises the two-pass variance), weight, bias, incoming grad dy."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    param_dtype = param_dtype or dtype
    x = (1.5 + 2.0 * torch.randn(shape, generator=g)).to(dtype)
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    x, w, b = (t.to(device).requires_grad_() for t in (x, w, b))
    return x, w, b, dy.to(device)


def _close(ours, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{what}: {ours.dtype}{tuple(ours.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_against_reference(shape, dtype, param_dtype=None, eps=1e-5, device="cpu"):
    x, w, b, dy = _inputs(shape, dtype, param_dtype, device)
    with kernels.backend("cuda"):
        y = kernels.layer_norm(x, w, b, eps)
    y_ref = reference.layer_norm(x, w, b, eps)
    _close(y, y_ref, dtype, "y")
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        _close(g, g_ref, dtype, name)


# ------------------------------------------------------------------------------------ registration


def test_opcheck_forward_schema_fake_and_autograd():
    for dtype in (torch.float32, torch.float64):
        x, w, b, _ = _inputs((7, 33), dtype)
        torch.library.opcheck(ops.layer_norm_fwd.default, (x, w, b, 1e-5))
    x, w, b, _ = _inputs((5, 16), torch.float32)
    torch.library.opcheck(ops.layer_norm_fwd.default, (x.detach(), w.detach(), b.detach(), 1e-3))


def test_opcheck_backward():
    x, w, b, dy = (t.detach() for t in _inputs((7, 33), torch.float32))
    _, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
    torch.library.opcheck(ops.layer_norm_bwd.default, (dy, x, w, mean, rstd))


def test_backend_registers_every_op_and_auto_never_picks_it():
    cpu = torch.device("cpu")
    with kernels.backend("cuda"):
        for op in backends.OPS:
            assert backends.unavailable_reason("cuda", op, cpu) is None
            assert backends.resolve(op, cpu) is getattr(_cuda_backend, op)
    # not before its CUDA kernels have passed the GPU tests on a real device (see AUTO_PREFERENCE)
    assert "cuda" not in backends.AUTO_PREFERENCE["cpu"] and "cuda" not in backends.AUTO_PREFERENCE["cuda"]


def test_saved_statistics_are_mean_and_rstd():
    x = torch.randn(5, 300) * 3 + 1
    y, mean, rstd = ops.layer_norm_fwd(x, torch.ones(300), torch.zeros(300), 1e-5)
    assert y.is_contiguous() and mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-5))


# ------------------------------------------------------------------------------ CPU kernels vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("M", ROWS)
def test_cpu_forward_and_grads_match_reference(M, C, dtype):
    _check_against_reference((M, C), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("C", WIDTHS)
def test_cpu_low_precision_matches_reference(C, dtype):
    _check_against_reference((33, C), dtype)


def test_cpu_leading_dims_eps_and_strided_input():
    _check_against_reference((2, 3, 130), torch.float64, eps=1e-3)
    base = torch.randn(5, 64)
    x = base[:, :40].requires_grad_()  # row stride 64: not contiguous
    w = torch.randn(40, 2)[:, 1].requires_grad_()  # stride 2
    b = torch.randn(40, requires_grad=True)
    dy = torch.randn(40, 5).t()  # column stride 5
    with kernels.backend("cuda"):
        y = kernels.layer_norm(x, w, b)
    y_ref = reference.layer_norm(x, w, b)
    _close(y, y_ref, torch.float32, "strided y")
    for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)):
        _close(g, g_ref, torch.float32, "strided grads")


def test_cpu_params_in_another_dtype_than_x():
    """fp32 weight/bias with fp16 x: output in x's dtype, parameter grads back in fp32."""
    x, w, b, dy = _inputs((6, 200), torch.float16, param_dtype=torch.float32)
    with kernels.backend("cuda"):
        y = kernels.layer_norm(x, w, b)
    assert y.dtype == torch.float16
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    assert dx.dtype == torch.float16 and dw.dtype == db.dtype == torch.float32
    y_ref = reference.layer_norm(x, w.half().float(), b.half().float())  # the wrapper rounds w, b to fp16
    _close(y, y_ref, torch.float16, "y")


def test_cpu_empty_rows():
    x, w, b, _ = _inputs((0, 16), torch.float32)
    with kernels.backend("cuda"):
        y = kernels.layer_norm(x, w, b)
    assert y.shape == (0, 16)
    dw, db = torch.autograd.grad(y.sum(), (w, b))
    assert dw.shape == (16,) and not dw.any() and not db.any()


# ----------------------------------------------------------------------------------- TORCH_CHECKs


def _bad_calls():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    _, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
    return [
        ("weight", lambda: ops.layer_norm_fwd(x, torch.randn(9), b, 1e-5)),
        ("bias", lambda: ops.layer_norm_fwd(x, w, b.double(), 1e-5)),
        ("x", lambda: ops.layer_norm_fwd(torch.randn(2, 3, 8), w, b, 1e-5)),
        ("x", lambda: ops.layer_norm_fwd(torch.ones(4, 8, dtype=torch.int32), w, b, 1e-5)),
        ("eps", lambda: ops.layer_norm_fwd(x, w, b, -1.0)),
        ("dy", lambda: ops.layer_norm_bwd(torch.randn(4, 7), x, w, mean, rstd)),
        ("mean", lambda: ops.layer_norm_bwd(x, x, w, mean.double(), rstd)),
        ("rstd", lambda: ops.layer_norm_bwd(x, x, w, mean, rstd[:3])),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_inputs_raise_naming_the_tensor(case):
    name, call = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b") as info:
        call()
    if name != "eps":
        assert "shape" in str(info.value) and "dtype" in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------- compile


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_fullgraph_cpu():
    """register_fake + register_autograd let torch.compile trace the public API, forward and backward, in one graph.

    The default (inductor) backend: ~10 s on 2 cores with a cold cache, most of it compiling the
    surrounding ``x * 2`` and ``sum`` to C++ (needs gcc); our op stays an opaque extern call.
    """
    torch._dynamo.reset()

    def f(x, w, b):
        return kernels.layer_norm(x * 2.0, w, b, 1e-5).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    x, w, b, _ = _inputs((3, 5, 64), torch.float32)
    start = time.perf_counter()
    with kernels.backend("cuda"):
        out = compiled(x, w, b)
    out.sum().backward()
    assert time.perf_counter() - start < 60
    grads = (x.grad, w.grad, b.grad)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = reference.layer_norm(x2 * 2.0, w2, b2).sum(-1)
    ref.sum().backward()
    _close(out, ref, torch.float32, "compiled forward")
    for g, g_ref in zip(grads, (x2.grad, w2.grad, b2.grad)):
        _close(g, g_ref, torch.float32, "compiled grads")


# ------------------------------------------------------------ which GPUs the library runs on (faked)
# No GPU here: _device_capability (and, where a test says so, the library's compiled targets) are
# replaced, and the CUDA tensors are FakeTensors, which carry a device but no memory.


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu((7, 5), "sm_80,sm_90"): cuda:0 has that compute capability, the library those targets
    (None: the real library's kernels._C.cuda_archs)."""
    def make(capability, archs=None):
        monkeypatch.setattr(_cuda_backend, "_device_capability", lambda device: capability)
        if archs is not None:
            monkeypatch.setattr(_cuda_backend, "_compiled_archs", lambda: archs)
        monkeypatch.setattr(_cuda_backend, "_gpu_reasons", {})  # forget answers about the real (or no) GPU
    return make


def _fake_cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, device="cuda", dtype=dtype)  # under FakeTensorMode: a device, no memory


CUDA0 = torch.device("cuda", 0)


def test_attention_below_compute_capability_8_says_so_instead_of_launching(fake_gpu):
    fake_gpu((7, 5), "sm_75,sm_80,sm_90")
    reason = _cuda_backend.gpu_unavailable_reason("causal_attention", CUDA0, needs_sm80=True)
    assert "needs compute capability 8.0+" in reason and "cuda:0 has 7.5" in reason
    with FakeTensorMode(), kernels.backend("cuda"):
        q = _fake_cuda(1, 2, 8, 64)
        with pytest.raises(backends.BackendUnavailableError, match=r"needs compute capability 8\.0\+"):
            kernels.causal_attention(q, q, q)
        # LayerNorm and cross-entropy have Turing code in such a library: they run
        assert _cuda_backend.gpu_unavailable_reason("layer_norm", CUDA0) is None
        x, w = _fake_cuda(4, 64), _fake_cuda(64)
        assert kernels.layer_norm(x, w, w).shape == (4, 64)
    fake_gpu((8, 0), "sm_75,sm_80,sm_90")
    assert _cuda_backend.gpu_unavailable_reason("causal_attention", CUDA0, needs_sm80=True) is None


def test_a_library_without_code_for_the_gpu_says_how_to_rebuild(fake_gpu):
    fake_gpu((12, 0), "sm_80,sm_90")
    reason = _cuda_backend.gpu_unavailable_reason("layer_norm", CUDA0)
    assert "compiled for sm_80, sm_90, which cannot run on cuda:0 (compute capability 12.0)" in reason
    assert "pip install -e . --no-build-isolation --no-deps" in reason and "TORCH_CUDA_ARCH_LIST=12.0" in reason
    with FakeTensorMode(), kernels.backend("cuda"):
        x, w = _fake_cuda(4, 64), _fake_cuda(64)
        with pytest.raises(backends.BackendUnavailableError, match="rebuild it for this GPU"):
            kernels.layer_norm(x, w, w)
    fake_gpu((7, 5), "sm_80,sm_90")  # attention: no rebuild helps below 8.0, so that is what it says
    assert "needs compute capability 8.0+" in _cuda_backend.gpu_unavailable_reason("causal_attention", CUDA0, True)
    assert "rebuild it for this GPU" in _cuda_backend.gpu_unavailable_reason("cross_entropy", CUDA0)
    fake_gpu((9, 0), "")
    assert "built without its CUDA kernels" in _cuda_backend.gpu_unavailable_reason("layer_norm", CUDA0)


def test_the_gpu_check_traces_into_one_graph(fake_gpu):
    # torch.compile(fullgraph=True) of a model on the cuda backend passes through this check in every op
    fake_gpu((9, 0), "sm_80,sm_90")

    def f(x):
        _cuda_backend._check_gpu(CUDA0, "layer_norm")
        return x * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2)), torch.full((2,), 2.0))


def test_which_compiled_code_runs_on_which_gpu():
    runs = _cuda_backend._runs_on
    assert runs(["sm_80"], (8, 0)) and runs(["sm_80"], (8, 6)) and runs(["sm_80"], (8, 9))  # same major, newer minor
    assert not runs(["sm_80", "sm_90"], (7, 5)) and not runs(["sm_80", "sm_90"], (10, 0))
    assert not runs(["sm_86"], (8, 0)) and not runs(["sm_90"], (8, 9))
    assert runs(["sm_80", "compute_90"], (12, 0)) and not runs(["compute_90"], (8, 9))  # PTX: JIT from 9.0 up
    assert runs(["sm_90a"], (9, 0)) and not runs(["sm_90a"], (9, 1))  # arch-specific code: that arch only
    assert runs(["sm_75", "sm_80", "sm_90"], (7, 5))


def test_the_library_records_what_it_was_compiled_for():
    archs = kernels._C.cuda_archs  # "" in a CPU-only build
    assert re.fullmatch(r"((sm|compute)_\d+a?)(,(sm|compute)_\d+a?)*|", archs), archs


def test_cpu_tensors_never_ask_for_a_gpu(monkeypatch):
    def no_gpu(device):
        raise AssertionError("the capability of a GPU was asked for with CPU tensors")

    monkeypatch.setattr(_cuda_backend, "_device_capability", no_gpu)
    x, w, b, _ = _inputs((3, 16), torch.float32)
    q = torch.randn(1, 1, 4, 8)
    with kernels.backend("cuda"):
        kernels.layer_norm(x, w, b)
        kernels.causal_attention(q, q, q)


# ---------------------------------------------------------------------------------- GPU (CUDA kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1, 768, 1000, 4096, 1023])
def test_gpu_fp32_matches_reference_vector_and_scalar_paths(C):
    _check_against_reference((37, C), torch.float32, device="cuda")
    # an unaligned view (offset by one element) must take the scalar path and still be right
    x = torch.randn(9, C + 1, device="cuda")[:, 1:]
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    y, _, _ = ops.layer_norm_fwd(x, w, b, 1e-5)
    _close(y, reference.layer_norm(x, w, b), torch.float32, "unaligned y")


@pytest.mark.gpu
def test_gpu_opcheck():
    x, w, b, _ = _inputs((7, 256), torch.float32, device="cuda")
    torch.library.opcheck(ops.layer_norm_fwd.default, (x, w, b, 1e-5))
    x, w, b, dy = (t.detach() for t in _inputs((7, 256), torch.bfloat16, device="cuda"))
    _, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
    torch.library.opcheck(ops.layer_norm_bwd.default, (dy, x, w, mean, rstd))


# ------------------------------------------------------------------------------ add_layer_norm


def _add_inputs(shape, dtype, device="cpu", seed=1):
    """x, residual, weight, bias (leaves that need grad) and the incoming grads dy, dsum."""
    x, w, b, dy = _inputs(shape, dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    r = (-1.0 + torch.randn(shape, generator=g)).to(dtype).to(device).requires_grad_()
    dsum = torch.randn(shape, generator=g).to(dtype).to(device)
    return x, r, w, b, dy, dsum


def _check_add_against_reference(shape, dtype, device="cpu", eps=1e-5):
    x, r, w, b, dy, dsum = _add_inputs(shape, dtype, device)
    with kernels.backend("cuda"):
        y, total = kernels.add_layer_norm(x, r, w, b, eps)
    y_ref, total_ref = reference.add_layer_norm(x, r, w, b, eps)
    _close(total, total_ref, dtype, "sum")
    _close(y, y_ref, dtype, "y")
    grads = torch.autograd.grad((y, total), (x, r, w, b), (dy, dsum))
    grads_ref = torch.autograd.grad((y_ref, total_ref), (x, r, w, b), (dy, dsum))
    for name, g, g_ref in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_ref):
        _close(g, g_ref, dtype, name)


def test_opcheck_add_layer_norm():
    for dtype in (torch.float32, torch.float64):
        x, r, w, b, _, _ = _add_inputs((7, 33), dtype)
        torch.library.opcheck(ops.add_layer_norm_fwd.default, (x, r, w, b, 1e-5))
    x, r, w, b, _, _ = (t.detach() for t in _add_inputs((5, 16), torch.float32))
    torch.library.opcheck(ops.add_layer_norm_fwd.default, (x, r, w, b, 1e-3))


def test_add_layer_norm_outputs_and_saved_statistics():
    x, r = torch.randn(5, 300) * 3 + 1, torch.randn(5, 300)
    y, total, mean, rstd = ops.add_layer_norm_fwd(x, r, torch.ones(300), torch.zeros(300), 1e-5)
    assert y.is_contiguous() and total.is_contiguous() and mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(mean, total.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(total.var(-1, unbiased=False) + 1e-5))
    y_ln, mean_ln, rstd_ln = ops.layer_norm_fwd(total, torch.ones(300), torch.zeros(300), 1e-5)
    assert torch.equal(y, y_ln) and torch.equal(mean, mean_ln) and torch.equal(rstd, rstd_ln)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("C", WIDTHS)
def test_cpu_add_layer_norm_matches_reference(C, dtype):
    _check_add_against_reference((7, C), dtype)


def test_cpu_add_layer_norm_leading_dims_and_one_output_used():
    _check_add_against_reference((2, 3, 130), torch.float64, eps=1e-3)
    for used in (0, 1):  # only y, then only the sum, carries a gradient
        x, r, w, b, dy, _ = _add_inputs((4, 96), torch.float64)
        with kernels.backend("cuda"):
            out = kernels.add_layer_norm(x, r, w, b)[used]
        out_ref = reference.add_layer_norm(x, r, w, b)[used]
        got = torch.autograd.grad(out, (x, r, w, b), dy, allow_unused=True)
        want = torch.autograd.grad(out_ref, (x, r, w, b), dy, allow_unused=True)
        for name, g, g_ref in zip(("dx", "dresidual", "dweight", "dbias"), got, want):
            if g_ref is None or not g_ref.any():  # the sum alone does not depend on weight/bias
                assert g is None or not g.any(), f"{name} should be zero when only output {used} is used"
            else:
                _close(g, g_ref, torch.float64, f"{name} (output {used} used)")


def _bad_add_calls():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    return [
        ("residual", lambda: ops.add_layer_norm_fwd(x, torch.randn(4, 7), w, b, 1e-5)),
        ("residual", lambda: ops.add_layer_norm_fwd(x, x.double(), w, b, 1e-5)),
        ("weight", lambda: ops.add_layer_norm_fwd(x, x, torch.randn(9), b, 1e-5)),
        ("bias", lambda: ops.add_layer_norm_fwd(x, x, w, b.half(), 1e-5)),
        ("x", lambda: ops.add_layer_norm_fwd(torch.randn(8), torch.randn(8), w, b, 1e-5)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_add_layer_norm_bad_inputs_raise_naming_the_tensor(case):
    name, call = _bad_add_calls()[case]
    with pytest.raises(RuntimeError, match=rf"add_layer_norm_fwd: {name}\b.*shape.*dtype"):
        call()


def test_add_layer_norm_bad_eps_raises():
    with pytest.raises(RuntimeError, match="add_layer_norm_fwd: eps must be a finite positive number, got nan"):
        ops.add_layer_norm_fwd(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3), torch.zeros(3), float("nan"))


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1, 768, 1000, 4096, 1023])
def test_gpu_add_layer_norm_fp32_vector_and_scalar_paths(C):
    _check_add_against_reference((37, C), torch.float32, device="cuda")
    x = torch.randn(9, C + 1, device="cuda")[:, 1:]  # unaligned rows: the scalar path
    r = torch.randn(9, C, device="cuda")
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    y, total, _, _ = ops.add_layer_norm_fwd(x, r, w, b, 1e-5)
    y_ref, total_ref = reference.add_layer_norm(x, r, w, b)
    _close(total, total_ref, torch.float32, "unaligned sum")
    _close(y, y_ref, torch.float32, "unaligned y")


@pytest.mark.parametrize("name", ["cuda", "torch"])
def test_gpt_compiles_as_one_graph(name):
    """The whole GPT -- attention, both LayerNorms, the fused head + loss -- traces without a graph break.

    aot_eager runs the traced forward and backward graphs as they are (no code generation), so this
    checks the fake implementations and autograd registrations at model scale in a few seconds.
    """
    from llm.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 97, (2, 19))
    targets = idx.clone()
    targets[0, :4] = -100
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with kernels.backend(name):
        _, loss = compiled(idx, targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        _, eager_loss = model(idx, targets)
        eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {n}: {m}")
