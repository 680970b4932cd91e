"""Low precision on the device: every op of the "triton" and "cuda" backends, forward and every
gradient, in fp16 and bf16, against the fp32 reference.

The rule (flash-attention's): our max error against the fp32 reference is at most twice the error of
PyTorch's own op (SDPA, ``F.layer_norm``, ``F.cross_entropy``) run in the same dtype on the same
inputs, plus an atol relative to the reference's magnitude.  Each comparison is recorded (the ``lowp``
fixture in conftest.py) for the pass/fail table of ``bench/gpu_check.sh``.

These are GPU tests.  Under ``LLM_GPU_DRY_RUN=1`` (``bench/gpu_check.sh --dry-run``, which CI runs)
they run on the CPU at tiny shapes instead: the Triton kernels in Triton's interpreter (fp16 only: the
interpreter does not emulate bf16) and the extension's ops on their C++ CPU twins.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import backends, reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [pytest.mark.gpu, pytest.mark.dry_run]

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
BACKENDS = ["triton", "cuda"]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times the reference's largest magnitude


def _sizes(full, tiny):
    return full if CUDA else tiny


def _need(lowp, backend: str, op: str, dtype: torch.dtype) -> None:
    lowp.start(backend, op, dtype)
    reason = backends.unavailable_reason(backend, op, DEVICE)
    if reason:
        pytest.skip(reason)
    if backend == "triton" and not CUDA and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 (this case runs on a GPU)")


def _on(backend: str, fn):
    def run(*args):
        with kernels.backend(backend):
            return fn(*args)
    return run


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _value_and_grads(fn, inputs, grads):
    """fn's outputs and the gradients of its (first len(grads)) outputs w.r.t. fresh copies of inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [*outs, *torch.autograd.grad(outs[: len(grads)], leaves, grads)]


def _compare(lowp, names, ours, theirs, exact, dtype):
    lowp.compare({n: (o, t, e) for n, o, t, e in zip(names, ours, theirs, exact)}, atol=ATOL[dtype])


# ------------------------------------------------------------------------------------------ attention

# (Tq, Tk, D): training shapes, ragged tails, decoding (Tq < Tk, bottom-right mask), D = 80 (padded)
ATTN_SHAPES = _sizes(
    [(1024, 1024, 64), (1024, 1024, 128), (4096, 4096, 64), (4096, 4096, 128), (1000, 1000, 80), (1, 1, 64),
     (17, 17, 128), (257, 257, 64), (1, 513, 128), (100, 1000, 64), (7, 2048, 128), (64, 65, 64)],
    [(40, 40, 64), (1, 33, 128), (17, 50, 80)],
)


def _sdpa(q, k, v):
    """PyTorch's own attention with our mask: causal, aligned bottom-right when Tq < Tk; grouped-query
    (``enable_gqa``) when k/v have fewer heads than q."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, **gqa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq,Tk,D", ATTN_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(lowp, backend, Tq, Tk, D, dtype):
    _need(lowp, backend, "causal_attention", dtype)
    if backend == "cuda" and CUDA and D not in (64, 128):
        pytest.skip("the extension's CUDA attention kernels take head dims 64 and 128")
    B, H = _sizes((2, 4), (1, 2))
    g = _gen(0)
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, generator=g).to(dtype) for T in (Tq, Tk, Tk))
    do = torch.randn(B, H, Tq, D, device=DEVICE, generator=g).to(dtype)
    ours = _value_and_grads(_on(backend, kernels.causal_attention), (q, k, v), (do,))
    theirs = _value_and_grads(_sdpa, (q, k, v), (do,))
    exact = _value_and_grads(reference.causal_attention, (q.float(), k.float(), v.float()), (do.float(),))
    for t in ours:
        assert t.dtype == dtype
    _compare(lowp, ("out", "dq", "dk", "dv"), ours, theirs, exact, dtype)


# (B, H, H_kv, Tq, Tk, D): grouped-query attention -- Llama 3.2 1B (32 query heads, 8 k/v heads, D = 64),
# Qwen3 (16 / 8, D = 128), multi-query at an odd T, and decoding one token with a GQA cache
GQA_SHAPES = _sizes(
    [(1, 32, 8, 1024, 1024, 64), (1, 16, 8, 1024, 1024, 128), (2, 8, 1, 257, 257, 128), (4, 32, 8, 1, 513, 64)],
    [(1, 4, 2, 40, 40, 64), (1, 4, 1, 1, 33, 128)],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,H_kv,Tq,Tk,D", GQA_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gqa(lowp, backend, B, H, H_kv, Tq, Tk, D, dtype):
    """k/v with H_kv < H heads: out, dq, and dk, dv summed over each group, against SDPA's enable_gqa."""
    _need(lowp, backend, "causal_attention", dtype)
    g = _gen(1)
    q = torch.randn(B, H, Tq, D, device=DEVICE, generator=g).to(dtype)
    k, v = (torch.randn(B, H_kv, Tk, D, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    do = torch.randn(B, H, Tq, D, device=DEVICE, generator=g).to(dtype)
    ours = _value_and_grads(_on(backend, kernels.causal_attention), (q, k, v), (do,))
    theirs = _value_and_grads(_sdpa, (q, k, v), (do,))
    exact = _value_and_grads(reference.causal_attention, (q.float(), k.float(), v.float()), (do.float(),))
    for t, like in zip(ours, (q, q, k, v)):
        assert t.dtype == dtype and t.shape == like.shape
    _compare(lowp, ("out", "dq", "dk", "dv"), ours, theirs, exact, dtype)


# ------------------------------------------------------------------------------------------ LayerNorm

LN_WIDTHS = _sizes([768, 1000, 4096, 8192, 12288, 16384], [768, 1000])


def _ln_inputs(C, dtype, seed):
    g = _gen(seed)
    shape = _sizes((8, 509, C), (3, 7, C))  # 4072 rows: not a multiple of the program count
    x = (1.5 + 2.0 * torch.randn(shape, device=DEVICE, generator=g)).to(dtype)  # a nonzero mean
    r = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    w = (1.0 + 0.5 * torch.randn(C, device=DEVICE, generator=g)).to(dtype)
    b = (0.5 * torch.randn(C, device=DEVICE, generator=g)).to(dtype)
    dy, ds = (torch.randn(shape, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    return x, r, w, b, dy, ds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", LN_WIDTHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm(lowp, backend, C, dtype):
    _need(lowp, backend, "layer_norm", dtype)
    x, _, w, b, dy, _ = _ln_inputs(C, dtype, 0)
    ours = _value_and_grads(_on(backend, lambda *t: kernels.layer_norm(*t, 1e-5)), (x, w, b), (dy,))
    theirs = _value_and_grads(lambda a, c, d: F.layer_norm(a, (C,), c, d, 1e-5), (x, w, b), (dy,))
    exact = _value_and_grads(lambda *t: reference.layer_norm(*t, 1e-5), (x.float(), w.float(), b.float()), (dy.float(),))
    _compare(lowp, ("y", "dx", "dweight", "dbias"), ours, theirs, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", LN_WIDTHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_layer_norm(lowp, backend, C, dtype):
    _need(lowp, backend, "add_layer_norm", dtype)
    x, r, w, b, dy, ds = _ln_inputs(C, dtype, 1)

    def pytorch(a, c, d, e):
        s = a + c
        return F.layer_norm(s, (C,), d, e, 1e-5), s

    inputs = (x, r, w, b)
    ours = _value_and_grads(_on(backend, lambda *t: kernels.add_layer_norm(*t, 1e-5)), inputs, (dy, ds))
    theirs = _value_and_grads(pytorch, inputs, (dy, ds))
    exact = _value_and_grads(lambda *t: reference.add_layer_norm(*t, 1e-5), [t.float() for t in inputs],
                             (dy.float(), ds.float()))
    _compare(lowp, ("y", "sum", "dx", "dresidual", "dweight", "dbias"), ours, theirs, exact, dtype)


# --------------------------------------------------------------------------------------- the loss

V = 50257  # GPT-2's vocabulary: rows that start at any alignment


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy(lowp, backend, dtype):
    _need(lowp, backend, "cross_entropy", dtype)
    N = _sizes(4096, 12)
    g = _gen(3)
    logits = (3.0 * torch.randn(N, V, device=DEVICE, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    y[::7] = -100
    ce = _on(backend, kernels.cross_entropy)
    one = torch.ones((), device=DEVICE)
    ours = _value_and_grads(lambda z: ce(z, y), (logits,), (one,))
    theirs = _value_and_grads(lambda z: F.cross_entropy(z, y), (logits,), (one.to(dtype),))
    exact = _value_and_grads(lambda z: reference.cross_entropy(z, y), (logits.float(),), (one,))
    assert ours[1].dtype == dtype
    _compare(lowp, ("loss", "dlogits"), ours, theirs, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy(lowp, backend, dtype):
    _need(lowp, backend, "linear_cross_entropy", dtype)
    N, C = _sizes((2048, 768), (20, 32))
    g = _gen(4)
    hidden = torch.randn(N, C, device=DEVICE, generator=g).to(dtype)
    weight = (0.02 * torch.randn(V, C, device=DEVICE, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    y[::5] = -100
    lce = _on(backend, kernels.linear_cross_entropy)
    one = torch.ones((), device=DEVICE)
    ours = _value_and_grads(lambda h, w: lce(h, w, y), (hidden, weight), (one,))
    theirs = _value_and_grads(lambda h, w: F.cross_entropy((h @ w.t()).float(), y), (hidden, weight), (one,))
    exact = _value_and_grads(lambda h, w: reference.linear_cross_entropy(h, w, y), (hidden.float(), weight.float()), (one,))
    _compare(lowp, ("loss", "dhidden", "dweight"), ours, theirs, exact, dtype)
