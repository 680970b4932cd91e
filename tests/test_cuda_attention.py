"""The extension's causal attention (csrc/attention_*.cpp/.cu) against kernels.reference.

Skipped as a whole only when ``kernels._C`` is not built.  Without a GPU the C++ CPU kernels (the twin
of the CUDA kernels: same tiles, same saved lse, same backward) run every test here except those
marked ``gpu``, which check the CUDA kernels against the fp32 reference on a device.
"""
import time

import pytest
import torch

pytest.importorskip("kernels._C", reason="kernels._C is not built; run `pip install -e . --no-build-isolation`")

import kernels
from kernels import _cuda_backend, backends, reference
from llm.model import GPT, Block, GPTConfig, KVCache

ops = torch.ops.llm_kernels

# dtype -> (atol, rtol) against the fp32 (fp64) reference.  fp16/bf16 inputs are the same rounded
# values on both sides; the kernels round only the output (the reference rounds its output too).
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}


def _inputs(B, H, Tq, Tk, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype) for T in (Tq, Tk, Tk))
    do = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    return q, k, v, do


def _run(fn, q, k, v, do, scale=None):
    """out and (dq, dk, dv) of fn on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, scale)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _cuda_backend_attention(q, k, v, scale=None):
    with kernels.backend("cuda"):
        return kernels.causal_attention(q, k, v, scale)


def _check(q, k, v, do, scale=None):
    """Our forward and every gradient against the reference (computed in fp32, or fp64 for fp64)."""
    dtype = q.dtype
    ours = _run(_cuda_backend_attention, q, k, v, do, scale)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = _run(reference.causal_attention, *(t.to(ref_dtype) for t in (q, k, v, do)), scale)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)}"
        torch.testing.assert_close(a.to(ref_dtype), b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def _lse_ref(q, k, scale):
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return s.masked_fill(~keep, float("-inf")).logsumexp(-1)


# ------------------------------------------------------------------------------------ registration


def test_opcheck_forward_and_backward():
    for dtype, (Tq, Tk, D) in ((torch.float64, (5, 9, 8)), (torch.float32, (7, 7, 16))):
        q, k, v, do = _inputs(1, 2, Tq, Tk, D, dtype)
        torch.library.opcheck(ops.attention_fwd.default, (q, k, v, 0.3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        torch.library.opcheck(ops.attention_fwd.default, (qg, kg, vg, 0.3))
        out, lse = ops.attention_fwd(q, k, v, 0.3)
        torch.library.opcheck(ops.attention_bwd.default, (do, q, k, v, out, lse, 0.3))


def test_backend_registers_causal_attention_but_auto_never_picks_it():
    cpu = torch.device("cpu")
    assert backends.unavailable_reason("cuda", "causal_attention", cpu) is None
    with kernels.backend("cuda"):
        assert backends.resolve("causal_attention", cpu) is _cuda_backend.causal_attention
    assert "cuda" not in backends.AUTO_PREFERENCE["cpu"] and "cuda" not in backends.AUTO_PREFERENCE["cuda"]


def test_lse_and_dtypes_of_the_saved_statistics():
    q, k, v, _ = _inputs(2, 1, 19, 40, 24, torch.float64)
    out, lse = ops.attention_fwd(q, k, v, 0.2)
    assert out.is_contiguous() and out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(lse, _lse_ref(q, k, 0.2), atol=1e-12, rtol=1e-12)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out, lse = ops.attention_fwd(q.to(dtype), k.to(dtype), v.to(dtype), 0.2)
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 1, 19)
        torch.testing.assert_close(lse.double(), _lse_ref(q.to(dtype), k.to(dtype), 0.2), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ CPU kernels vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("T", [1, 17, 97, 128, 257])
def test_cpu_matches_reference(T, D, dtype):
    B, H = (2, 1) if T < 128 else (1, 2)
    _check(*_inputs(B, H, T, T, D, dtype))


@pytest.mark.parametrize(
    "Tq,Tk,D", [(1, 1, 64), (1, 33, 16), (1, 97, 80), (5, 33, 64), (17, 100, 128), (64, 128, 16), (96, 257, 64)]
)
def test_cpu_fewer_queries_than_keys_bottom_right_mask(Tq, Tk, D):
    """KV-cache decoding: the Tq queries are the last Tq positions of the Tk keys."""
    _check(*_inputs(1, 2, Tq, Tk, D, torch.float64))


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_cpu_custom_scale(scale):
    _check(*_inputs(1, 1, 70, 70, 32, torch.float64), scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Tq,Tk,D", [(17, 17, 64), (97, 97, 80), (65, 130, 128)])
def test_cpu_low_precision_matches_fp32_reference(Tq, Tk, D, dtype):
    _check(*_inputs(1, 2, Tq, Tk, D, dtype))


def test_cpu_strided_views_of_a_fused_qkv():
    """The model's q, k, v are transposed slices of one (B, T, 3, H, D) projection: not contiguous."""
    B, T, H, D = 2, 45, 3, 16
    qkv = torch.randn(B, T, 3, H, D, dtype=torch.float64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views, stride(2) = 3*H*D
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, dtype=torch.float64).transpose(1, 2)  # a strided incoming gradient
    _check(q, k, v, do)
    # the op itself (not only the wrapper) accepts views
    out, lse = ops.attention_fwd(q, k, v, 0.25)
    out2, lse2 = ops.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), 0.25)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_cpu_deterministic_across_thread_counts():
    q, k, v, do = _inputs(2, 2, 150, 150, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(_cuda_backend_attention, q, k, v, do)
        torch.set_num_threads(2)
        two = _run(_cuda_backend_attention, q, k, v, do)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- TORCH_CHECKs


def _bad_calls():
    q, k, v, do = _inputs(1, 2, 4, 6, 8)
    out, lse = ops.attention_fwd(q, k, v, 0.5)
    return [
        ("q", lambda: ops.attention_fwd(q[0], k, v, 0.5)),  # 3-D
        ("q", lambda: ops.attention_fwd(q.to(torch.int32), k, v, 0.5)),
        ("k", lambda: ops.attention_fwd(q, k.double(), v, 0.5)),
        ("v", lambda: ops.attention_fwd(q, k, v[:, :, :5], 0.5)),  # k and v differ
        ("k", lambda: ops.attention_fwd(q, k[..., :4], v[..., :4], 0.5)),  # head dims differ
        ("k", lambda: ops.attention_fwd(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), 0.5)),  # 2 % 3 heads
        ("Tq", lambda: ops.attention_fwd(torch.randn(1, 2, 7, 8), k, v, 0.5)),  # Tq > Tk
        ("q", lambda: ops.attention_fwd(q[:, :, :0], k, v, 0.5)),  # empty
        ("scale", lambda: ops.attention_fwd(q, k, v, float("nan"))),
        ("dout", lambda: ops.attention_bwd(do[:, :, :3], q, k, v, out, lse, 0.5)),
        ("out", lambda: ops.attention_bwd(do, q, k, v, out.double(), lse, 0.5)),
        ("lse", lambda: ops.attention_bwd(do, q, k, v, out, lse.double(), 0.5)),
        ("lse", lambda: ops.attention_bwd(do, q, k, v, out, lse[..., :3], 0.5)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_inputs_raise_naming_the_tensor(case):
    name, call = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b") as info:
        call()
    if name not in ("scale",):
        assert "shape" in str(info.value) and "dtype" in str(info.value), str(info.value)


# --------------------------------------------------------------------------- grouped-query attention
# k/v (B, H_kv, Tk, D) with H_kv < H: query head h reads k/v head h // (H / H_kv); dk, dv (of k/v's
# shape) sum over each group, in the kernels, without atomics and without repeating k and v.


def _gqa_inputs(B, H, H_kv, Tq, Tk, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H_kv, Tk, D, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, generator=g).to(device, dtype)


def test_gqa_opcheck_forward_and_backward():
    for dtype, (H, H_kv, Tq, Tk, D) in ((torch.float64, (4, 2, 5, 9, 8)), (torch.float32, (4, 1, 7, 7, 16))):
        q, k, v, do = _gqa_inputs(1, H, H_kv, Tq, Tk, D, dtype)
        torch.library.opcheck(ops.attention_fwd.default, (q, k, v, 0.3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        torch.library.opcheck(ops.attention_fwd.default, (qg, kg, vg, 0.3))
        out, lse = ops.attention_fwd(q, k, v, 0.3)
        assert out.shape == q.shape and lse.shape == (1, H, Tq)
        dq, dk, dv = ops.attention_bwd(do, q, k, v, out, lse, 0.3)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        torch.library.opcheck(ops.attention_bwd.default, (do, q, k, v, out, lse, 0.3))


def test_gqa_fakes_give_dk_dv_of_k_v_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v, do = _gqa_inputs(2, 8, 2, 3, 11, 64, torch.bfloat16)
        out, lse = ops.attention_fwd(q, k, v, 0.125)
        dq, dk, dv = ops.attention_bwd(do, q, k, v, out, lse, 0.125)
    assert out.shape == (2, 8, 3, 64) and lse.shape == (2, 8, 3) and lse.dtype == torch.float32
    assert dq.shape == (2, 8, 3, 64) and dk.shape == dv.shape == (2, 2, 11, 64)


# H_kv in {1, 2}, H in {4, 8} (H_kv = H is the MHA tests above); D in {16, 64, 80, 128}; odd T; T = 130
# spans three 64-key tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize(
    "B,H,H_kv,T,D", [(2, 4, 1, 17, 16), (1, 4, 2, 97, 64), (1, 8, 2, 33, 80), (1, 8, 1, 130, 128), (2, 8, 4, 65, 64)]
)
def test_gqa_cpu_matches_reference(B, H, H_kv, T, D, dtype):
    _check(*_gqa_inputs(B, H, H_kv, T, T, D, dtype))


@pytest.mark.parametrize(
    "H,H_kv,Tq,Tk,D", [(4, 1, 1, 1, 64), (8, 2, 1, 97, 128), (4, 2, 5, 33, 16), (8, 1, 17, 100, 80)]
)
def test_gqa_cpu_decoding_bottom_right_mask(H, H_kv, Tq, Tk, D):
    """KV-cache decoding with a GQA cache: Tq (often 1) new queries per head against Tk cached keys."""
    _check(*_gqa_inputs(1, H, H_kv, Tq, Tk, D, torch.float64))


def test_gqa_cpu_dk_dv_are_the_group_sums():
    """dk, dv are exactly what MHA on k/v repeated per query head gives, summed over each group."""
    B, H, H_kv, T, D = 1, 8, 2, 70, 32
    q, k, v, do = _gqa_inputs(B, H, H_kv, T, T, D, torch.float64)
    _, _, dk, dv = _run(_cuda_backend_attention, q, k, v, do)
    rep = (t.repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    _, _, dk_m, dv_m = _run(_cuda_backend_attention, q, *rep, do)
    torch.testing.assert_close(dk, dk_m.view(B, H_kv, H // H_kv, T, D).sum(2), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dv, dv_m.view(B, H_kv, H // H_kv, T, D).sum(2), atol=1e-12, rtol=1e-12)


def _fused_gqa_views(B, T, H, H_kv, D, dtype, device="cpu", seed=3):
    """q, k, v as a Llama-style model makes them: one (B, T, H + 2*H_kv, D) projection, split and
    transposed to (B, heads, T, D) views (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, H + 2 * H_kv, D, generator=g).to(device, dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([H, H_kv, H_kv], dim=2))
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k, v, torch.randn(B, H, T, D, generator=g).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gqa_cpu_strided_views_of_a_fused_qkv(dtype):
    q, k, v, do = _fused_gqa_views(2, 45, 4, 2, 16, dtype)
    _check(q, k, v, do)
    out, lse = ops.attention_fwd(q, k, v, 0.25)
    out2, lse2 = ops.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), 0.25)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_gqa_cpu_deterministic_across_thread_counts():
    q, k, v, do = _gqa_inputs(1, 8, 2, 150, 150, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(_cuda_backend_attention, q, k, v, do)
        torch.set_num_threads(2)
        two = _run(_cuda_backend_attention, q, k, v, do)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_gqa_heads_not_a_multiple_raise_the_validation_error():
    q, k, v, _ = _gqa_inputs(1, 4, 3, 5, 5, 16)
    with kernels.backend("cuda"), pytest.raises(ValueError, match="q's 4 heads must be a multiple of k/v's 3"):
        kernels.causal_attention(q, k, v)
    with pytest.raises(RuntimeError, match="4 heads must be a multiple of k/v's 3"):
        ops.attention_fwd(q, k, v, 0.25)


# ------------------------------------------------------------------------------- compile and model


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_fullgraph_cpu():
    """register_fake + register_autograd let torch.compile trace forward and backward in one graph."""
    torch._dynamo.reset()

    def f(q, k, v):
        return kernels.causal_attention(q * 2.0, k, v).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    q, k, v, _ = _inputs(2, 2, 21, 33, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    with kernels.backend("cuda"):
        out = compiled(q, k, v)
    out.sum().backward()
    assert time.perf_counter() - start < 60
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference.causal_attention(q2 * 2.0, k2, v2).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=2e-5)


def _block_grads(backend, block, x):
    block.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    with kernels.backend(backend):
        y = block(xi)
    y.backward(torch.ones_like(y))
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
    return y.detach(), xi.grad, grads


def test_transformer_block_cuda_backend_matches_torch_cpu():
    """A pre-LN block (attention and LayerNorm on the extension's CPU kernels) vs the torch backend."""
    torch.manual_seed(0)
    block = Block(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=64), layer_idx=0)
    x = torch.randn(2, 23, 64)
    ours, ref = _block_grads("cuda", block, x), _block_grads("torch", block, x)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)
    for name in ref[2]:
        torch.testing.assert_close(ours[2][name], ref[2][name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_kv_cache_decoding_on_the_cuda_backend():
    """Token-by-token decoding with a KV cache (Tq = 1 < Tk) gives the full causal forward's outputs."""
    torch.manual_seed(0)
    block = Block(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), layer_idx=0).eval()
    x = torch.randn(1, 12, 32)
    with torch.no_grad(), kernels.backend("cuda"):
        full = block(x)
        cache = KVCache(1)
        steps = [block(x[:, :5], cache)] + [block(x[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_gpt_on_cuda_backend_matches_torch_cpu():
    """The whole model on the extension's C++ CPU kernels: logits, loss and every gradient."""
    assert backends.available_backends("cpu")["cuda"] is None
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 97, (2, 19))
    results = {}
    for name in ("torch", "cuda"):
        model.zero_grad(set_to_none=True)
        with kernels.backend(name):
            logits, loss = model(idx, idx, return_logits=True)
            loss.backward()
        results[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["cuda"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for n, g in results["torch"][1].items():
        torch.testing.assert_close(results["cuda"][1][n], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"grad of {n}: {m}")


# ---------------------------------------------------------------------------------- GPU (CUDA kernels)


def _err(a, ref):
    return (a.float() - ref.float()).abs().max().item()


@pytest.mark.gpu
def test_gpu_lse_opcheck_and_unaligned_strided_inputs():
    q, k, v, do = _inputs(1, 2, 70, 130, 64, torch.bfloat16, device="cuda")
    out, lse = ops.attention_fwd(q, k, v, 0.125)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double().cpu(), _lse_ref(q.cpu(), k.cpu(), 0.125), atol=1e-4, rtol=1e-4)
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, 0.125))
    torch.library.opcheck(ops.attention_bwd.default, (do, q, k, v, out, lse, 0.125))
    # a view whose data starts 2 bytes past an aligned address, and fused-QKV strided views
    base = torch.randn(1 * 2 * 70 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q_odd = base[1:].view(1, 2, 70, 64)
    out_odd, _ = ops.attention_fwd(q_odd, k, v, 0.125)
    torch.testing.assert_close(out_odd, ops.attention_fwd(q_odd.clone(), k, v, 0.125)[0], atol=0, rtol=0)
    qkv = torch.randn(2, 300, 3, 2, 128, device="cuda", dtype=torch.float16)
    _check(*(qkv[:, :, i].transpose(1, 2) for i in range(3)), torch.randn(2, 2, 300, 128, device="cuda").half())


@pytest.mark.gpu
def test_gpu_gqa_opcheck_and_fused_views():
    """GQA on the CUDA kernels: opcheck (fakes, autograd registration), and the model's strided views of
    a fused (B, T, H + 2*H_kv, D) projection give bitwise what contiguous copies give.  (Accuracy in
    bf16/fp16 against the fp32 reference, within 2x SDPA's own error: tests/test_lowp.py.)"""
    q, k, v, do = _gqa_inputs(1, 8, 2, 70, 130, 64, torch.bfloat16, device="cuda")
    out, lse = ops.attention_fwd(q, k, v, 0.125)
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, 0.125))
    torch.library.opcheck(ops.attention_bwd.default, (do, q, k, v, out, lse, 0.125))
    q, k, v, do = _fused_gqa_views(2, 300, 8, 2, 128, torch.bfloat16, device="cuda")
    strided = _run(_cuda_backend_attention, q, k, v, do)
    dense = _run(_cuda_backend_attention, q.contiguous(), k.contiguous(), v.contiguous(), do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), strided, dense):
        assert torch.equal(a, b), name
    assert strided[2].shape == k.shape


@pytest.mark.gpu
def test_gpu_unsupported_inputs_raise_clearly():
    q, k, v, _ = _inputs(1, 1, 8, 8, 80, torch.float16, device="cuda")
    with pytest.raises(kernels.BackendUnavailableError, match="head dims 64, 128"):
        _cuda_backend_attention(q, k, v)
    with pytest.raises(RuntimeError, match="head dims D in"):
        ops.attention_fwd(q, k, v, 0.1)
    q, k, v, _ = _inputs(1, 1, 8, 8, 64, torch.float32, device="cuda")
    with pytest.raises(kernels.BackendUnavailableError, match="float16 or bfloat16"):
        _cuda_backend_attention(q, k, v)
    out = _cuda_backend_attention(q.double(), k.double(), v.double())  # float64: the reference
    torch.testing.assert_close(out, reference.causal_attention(q.double(), k.double(), v.double()))


@pytest.mark.gpu
def test_gpu_block_under_bf16_autocast_matches_torch():
    """The attention module in a real setting: a block under bf16 autocast, head dim 64."""
    torch.manual_seed(0)
    block = Block(GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=512), layer_idx=0).cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = _block_grads("cuda", block, x)
        ref = _block_grads("torch", block, x)
    for name, a, b in (("y", ours[0], ref[0]), ("dx", ours[1], ref[1])):
        scale = b.abs().max().item()
        assert _err(a, b) <= 3e-2 * max(scale, 1.0), f"{name}: max error {_err(a, b):.3g} (scale {scale:.3g})"
