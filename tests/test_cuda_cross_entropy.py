"""The extension's cross-entropy ops and the "cuda" backend's cross_entropy / linear_cross_entropy.

The ops (csrc/cross_entropy_cpu.cpp, csrc/cross_entropy_cuda.cu) against ``kernels.reference``:
opcheck, forward and dlogits on awkward shapes and every dtype, ignored targets, the TORCH_CHECK
messages, torch.compile; the chunked linear-CE (kernels/_chunked_linear_ce.py driving the ops).  The
C++ CPU kernels run everywhere; the CUDA kernels only in the tests marked ``gpu``.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("kernels._C", reason="kernels._C is not built; run `pip install -e . --no-build-isolation`")

import kernels
from kernels import _cuda_backend, backends, reference

ops = torch.ops.llm_kernels

# dtype -> (atol, rtol) for the loss and dlogits.  Both sides compute in fp32 (fp64) from the same
# inputs and round dlogits once, so fp16/bf16 gradients agree to about one ulp of the output.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-6, 2e-3),
    torch.bfloat16: (1e-6, 1.6e-2),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]


def _logits(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=g)).to(dtype).to(device)


def _targets(shape, V, ignore_every=0, ignore_index=-100, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, V, shape, generator=g)
    if ignore_every:
        y.view(-1)[::ignore_every] = ignore_index
    return y.to(device)


def _close(ours, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{what}: {ours.dtype}{tuple(ours.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _ce_and_grad(fn, logits, targets, ignore_index=-100, grad_scale=2.5):
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, targets, ignore_index)
    (loss * grad_scale).backward()
    return loss.detach(), z.grad


def ours_ce(logits, targets, ignore_index=-100):
    with kernels.backend("cuda"):
        return kernels.cross_entropy(logits, targets, ignore_index)


def ours_lce(hidden, weight, targets, ignore_index=-100, chunk_rows=None):
    return _cuda_backend.linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, chunk_rows)


def _check_ce(shape, dtype, ignore_every=3, ignore_index=-100):
    V = shape[-1]
    logits = _logits(shape, dtype)
    y = _targets(shape[:-1], V, ignore_every, ignore_index)
    loss, grad = _ce_and_grad(ours_ce, logits, y, ignore_index)
    ref_loss, ref_grad = _ce_and_grad(reference.cross_entropy, logits, y, ignore_index)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    _close(loss, ref_loss, loss_dtype, "loss")
    assert loss.shape == () and loss.dtype == loss_dtype
    _close(grad, ref_grad, dtype, "dlogits")
    ignored = y == ignore_index
    assert torch.all(grad[ignored] == 0), "ignored rows must get exactly zero gradient"


# ------------------------------------------------------------------------------------ registration


def test_opcheck_cross_entropy_ops():
    for dtype in (torch.float32, torch.float64):
        z = _logits((7, 11), dtype).requires_grad_()
        torch.library.opcheck(ops.cross_entropy_fwd.default, (z, _targets((7,), 11, 3), -100))
    z = _logits((5, 9), torch.float32)
    y = _targets((5,), 9, 2, ignore_index=4)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (z, y, 4))
    _, stats = ops.cross_entropy_fwd(z, y, 4)
    torch.library.opcheck(ops.cross_entropy_bwd.default, (torch.tensor(1.5), z, y, stats, 4))


def test_backend_registers_the_loss_ops_and_auto_never_picks_cuda():
    cpu = torch.device("cpu")
    with kernels.backend("cuda"):
        for op in ("cross_entropy", "linear_cross_entropy", "add_layer_norm"):
            assert backends.unavailable_reason("cuda", op, cpu) is None
            assert backends.resolve(op, cpu) is getattr(_cuda_backend, op)
    assert "cuda" not in backends.AUTO_PREFERENCE["cpu"] and "cuda" not in backends.AUTO_PREFERENCE["cuda"]


def test_saved_stats_are_the_rows_max_and_log_sum_kept_apart():
    z = _logits((6, 300), torch.float32)
    y = _targets((6,), 300)
    loss, stats = ops.cross_entropy_fwd(z, y, -100)
    assert stats.dtype == torch.float32 and stats.shape == (6, 2)
    m, log_s = stats.unbind(1)
    torch.testing.assert_close(m, z.amax(-1), atol=0, rtol=0)
    torch.testing.assert_close(log_s, torch.logsumexp(z - m[:, None], -1))
    torch.testing.assert_close(loss, (log_s - (z.gather(1, y[:, None])[:, 0] - m)).mean())


# ------------------------------------------------------------------------------ CPU kernels vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(33, 7), (3, 50257)], ids=["V7", "V50257"])
def test_cpu_forward_and_dlogits_match_reference(shape, dtype):
    _check_ce(shape, dtype)


def test_cpu_leading_dims_custom_ignore_index_and_int32_targets():
    _check_ce((3, 5, 7), torch.float64, ignore_every=4, ignore_index=-1)
    _check_ce((9, 7), torch.float32, ignore_every=2, ignore_index=3)  # an ignore_index inside [0, V)
    logits = _logits((9, 13), torch.float32)
    y = _targets((9,), 13, 3).to(torch.int32)
    for got, want in zip(_ce_and_grad(ours_ce, logits, y), _ce_and_grad(reference.cross_entropy, logits, y)):
        _close(got, want, torch.float32, "int32 targets")


@pytest.mark.parametrize("V", [7, 50257])
def test_cpu_all_ignored_is_zero_with_zero_grad(V):
    logits = _logits((3, V), torch.float32)
    y = torch.full((3,), -1, dtype=torch.int64)
    loss, grad = _ce_and_grad(ours_ce, logits, y, ignore_index=-1)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert reference.cross_entropy(logits, y, -1).item() == 0.0


def test_cpu_masked_vocab_entries_of_minus_inf():
    """-inf logits (a masked vocabulary) add nothing, even as the first elements of a row."""
    logits = _logits((4, 40), torch.float32)
    logits[:, :5] = float("-inf")
    logits[1, 20:] = float("-inf")
    y = torch.tensor([7, 10, 39, 5])
    loss, grad = _ce_and_grad(ours_ce, logits, y)
    ref_loss, ref_grad = _ce_and_grad(reference.cross_entropy, logits, y)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    _close(loss, ref_loss, torch.float32, "loss")
    _close(grad, ref_grad, torch.float32, "dlogits")


def test_cpu_non_contiguous_logits_no_grad_and_retain_graph():
    logits = torch.randn(40, 10).t()[:, :37]  # (10, 37), vocab stride 10
    y = _targets((10,), 37, 3)
    with torch.no_grad():
        _close(ours_ce(logits, y), reference.cross_entropy(logits, y), torch.float32, "no-grad loss")
    z = logits.clone().requires_grad_()
    loss = ours_ce(z, y)
    loss.backward(retain_graph=True)
    g1 = z.grad.clone()
    (loss * 3).backward()
    torch.testing.assert_close(z.grad, 4 * g1)


# ----------------------------------------------------------------------------------- TORCH_CHECKs


def _bad_calls():
    z, y = torch.randn(4, 9), torch.tensor([1, 2, -100, 8])
    loss, stats = ops.cross_entropy_fwd(z, y, -100)
    one = torch.tensor(1.0)
    return [
        ("logits", "2-D", lambda: ops.cross_entropy_fwd(torch.randn(9), y, -100)),
        ("logits", "float32, float64", lambda: ops.cross_entropy_fwd(torch.ones(4, 9, dtype=torch.int32), y, -100)),
        ("targets", "dtype int64", lambda: ops.cross_entropy_fwd(z, y.int(), -100)),
        ("targets", r"shape \[4\]", lambda: ops.cross_entropy_fwd(z, y[:3], -100)),
        ("targets", r"in \[0, 9\) or equal ignore_index=-100; found 9 at row 1",
         lambda: ops.cross_entropy_fwd(z, torch.tensor([1, 9, 2, 3]), -100)),
        ("targets", "found -100 at row 2", lambda: ops.cross_entropy_bwd(one, z, y, stats, -1)),
        ("dloss", "0-d", lambda: ops.cross_entropy_bwd(one.reshape(1), z, y, stats, -100)),
        ("stats", "dtype Float", lambda: ops.cross_entropy_bwd(one, z, y, stats.double(), -100)),
        ("stats", r"shape \[4, 2\]", lambda: ops.cross_entropy_bwd(one, z, y, stats[:2], -100)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_inputs_raise_naming_the_tensor(case):
    name, detail, call = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=rf"cross_entropy_(fwd|bwd): {name}\b.*{detail}") as info:
        call()
    assert "shape" in str(info.value) and "dtype" in str(info.value), str(info.value)


# ------------------------------------------------------------------------------- linear cross-entropy


def _lce_and_grads(fn, hidden, weight, targets, grad_scale=2.5, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("lead, chunk_rows", [((11,), 4), ((2, 5), 3), ((7,), 1), ((9,), None)])
def test_linear_cross_entropy_matches_reference(lead, chunk_rows, dtype):
    g = torch.Generator().manual_seed(1)
    C, V = 24, 77
    hidden = torch.randn(*lead, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) * 0.3).to(dtype)
    y = _targets(lead, V, 3, seed=1)
    loss, dh, dw = _lce_and_grads(ours_lce, hidden, weight, y, chunk_rows=chunk_rows)
    ref_loss, ref_dh, ref_dw = _lce_and_grads(reference.linear_cross_entropy, hidden, weight, y)
    assert dh.dtype == dw.dtype == dtype and dh.shape == hidden.shape
    atol, rtol = TOL[dtype] if dtype != torch.float16 else (1e-2, 1e-2)  # fp16 matmuls on both sides
    for what, got, want in (("loss", loss, ref_loss), ("dhidden", dh, ref_dh), ("dweight", dw, ref_dw)):
        torch.testing.assert_close(got, want, atol=max(atol, 1e-6), rtol=rtol, msg=lambda m, w=what: f"{w}: {m}")


def test_linear_cross_entropy_through_the_api_all_ignored_and_weight_only():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(13, 8, generator=g)
    y = _targets((6,), 13, 2)
    with kernels.backend("cuda"):
        ours = _lce_and_grads(kernels.linear_cross_entropy, hidden, weight, y)
    for got, want in zip(ours, _lce_and_grads(reference.linear_cross_entropy, hidden, weight, y)):
        _close(got, want, torch.float32, "api")
    w = weight.clone().requires_grad_()  # hidden needs no grad: only dweight is formed
    loss = ours_lce(hidden, w, torch.full((6,), -100), chunk_rows=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(w.grad == 0)


def test_linear_cross_entropy_gradient_accumulation():
    """Two half-batches, each loss weighted by its share of the valid targets, give the full batch's grads."""
    g = torch.Generator().manual_seed(2)
    N, C, V = 12, 16, 50
    hidden, weight = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    y = _targets((N,), V, 4, seed=2)
    y[:3] = -100  # the halves hold different numbers of valid targets
    full = _lce_and_grads(ours_lce, hidden, weight, y, grad_scale=1.0, chunk_rows=5)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    n_valid = (y != -100).sum()
    total = 0.0
    for part in (slice(0, N // 2), slice(N // 2, N)):
        share = (y[part] != -100).sum() / n_valid
        loss = ours_lce(h[part], w, y[part], chunk_rows=4) * share
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full[0])
    torch.testing.assert_close(h.grad, full[1])
    torch.testing.assert_close(w.grad, full[2])


class _Shapes(TorchDispatchMode):
    """Records the shape and bytes of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes, self.largest = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_linear_cross_entropy_never_forms_the_full_logits():
    N, C, V, rows = 64, 8, 300, 5
    hidden = torch.randn(N, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    with _Shapes() as mode:
        ours_lce(hidden, weight, _targets((N,), V, 4), chunk_rows=rows).backward()
    assert (N, V) not in mode.shapes and (rows, V) in mode.shapes
    assert mode.largest <= 4 * max(rows * V, V * C, N * C), (mode.largest, sorted(mode.shapes))


# --------------------------------------------------------------------------------------- compile


def test_torch_compile_fullgraph_cpu_through_add_layer_norm_and_cross_entropy():
    """register_fake + register_autograd let one fullgraph compile trace both ops, forward and backward.

    Through the public API: its host-side check of CPU targets' values is skipped while compiling
    (kernels/_validate.py), so it does not break the graph.
    """
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    B, T, C, V = 2, 5, 16, 11
    leaves = [torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g), 1 + 0.1 * torch.randn(C, generator=g),
              0.1 * torch.randn(C, generator=g), torch.randn(V, C, generator=g)]
    y = _targets((B, T), V, 3)

    def step(add_layer_norm, cross_entropy, x, r, w, b, head):
        normed, total = add_layer_norm(x * 2.0, r, w, b)
        return cross_entropy(normed @ head.t(), y) + total.square().mean()

    graphs = []

    def inductor_recording_the_graph(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(str(gm.graph))
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(lambda *a: step(kernels.add_layer_norm, kernels.cross_entropy, *a),
                             fullgraph=True, backend=inductor_recording_the_graph)
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    with kernels.backend("cuda"):
        loss = compiled(*ours)
    loss.backward()
    assert len(graphs) == 1 and all(f"llm_kernels.{op}" in graphs[0] for op in ("add_layer_norm_fwd", "cross_entropy_fwd"))
    loss_ref = step(reference.add_layer_norm, reference.cross_entropy, *ref)
    loss_ref.backward()
    _close(loss.detach(), loss_ref.detach(), torch.float32, "compiled loss")
    for name, a, b in zip(("x", "residual", "weight", "bias", "head"), ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


# ---------------------------------------------------------------------------------- GPU (CUDA kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(33, 7), (5, 50257), (3, 1000), (17, 4096)])
def test_gpu_fp32_matches_reference(shape):
    V = shape[-1]
    logits = _logits(shape, torch.float32, device="cuda")
    y = _targets(shape[:-1], V, 3, device="cuda")
    for got, want, what in zip(_ce_and_grad(ours_ce, logits, y), _ce_and_grad(reference.cross_entropy, logits, y),
                               ("loss", "dlogits")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m, w=what: f"{w}: {m}")
    # contiguous, but one element past a 16-byte boundary: the rows' heads differ, and logits and
    # the fresh dlogits disagree in alignment (the scalar backward)
    flat = _logits((shape[0] * V + 1,), torch.float32, device="cuda").requires_grad_()
    loss = ours_ce(flat[1:].view(shape), y)
    loss.backward()
    ref_loss, ref_grad = _ce_and_grad(reference.cross_entropy, flat.detach()[1:].view(shape), y, grad_scale=1.0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flat.grad[1:].view(shape), ref_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_opcheck_ignored_rows_and_out_of_range_targets():
    z = _logits((7, 300), torch.bfloat16, device="cuda").requires_grad_()
    y = _targets((7,), 300, 2, device="cuda")
    torch.library.opcheck(ops.cross_entropy_fwd.default, (z, y, -100))
    loss, grad = _ce_and_grad(ours_ce, z.detach(), torch.full_like(y, -100))
    assert loss.item() == 0.0 and torch.all(grad == 0)
    bad = y.clone()
    bad[3] = 300  # out of range: no trap on the device, a NaN loss and a NaN gradient row instead
    loss, stats = ops.cross_entropy_fwd(z.detach(), bad, -100)
    dz = ops.cross_entropy_bwd(torch.ones((), device="cuda"), z.detach(), bad, stats, -100)
    assert torch.isnan(loss) and torch.isnan(dz[3]).all() and not torch.isnan(dz[bad == -100]).any()


@pytest.mark.gpu
def test_gpu_linear_cross_entropy_peak_memory_is_below_the_logits():
    N, C, V = 16384, 768, 50257
    hidden = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, C, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with kernels.backend("cuda"):
        kernels.linear_cross_entropy(hidden, weight, y).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = N * V * 2
    # two (chunk, V) bf16 chunks (logits, dlogits) + fp32 dweight (+ its fp32 product) + dhidden, not N x V
    assert extra < logits_bytes / 2, (extra, logits_bytes)
