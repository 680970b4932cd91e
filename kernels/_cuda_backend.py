"""The "cuda" backend: the ops of the C++/CUDA extension ``kernels._C`` (sources in csrc/).

Imported by ``backends._load_backend("cuda")`` once ``from . import _C`` succeeded; loading ``_C``
registers the ops ``torch.ops.llm_kernels.layer_norm_fwd`` / ``layer_norm_bwd`` (schemas and CPU/CUDA
kernels, csrc/ops.cpp).  This module adds what torch needs on the Python side:

* a fake (meta) implementation of each op, so ``torch.compile`` / FakeTensor tracing know the output
  shapes without running a kernel;
* the autograd formula of ``layer_norm_fwd`` (its backward is the ``layer_norm_bwd`` op), registered
  with ``torch.library.register_autograd`` so torch.compile traces through it without a graph break;
* the backend's ``layer_norm``: (..., C) -> (M, C) rows, the op, and back to x's shape;
* ``add_layer_norm`` (op ``add_layer_norm_fwd``; its backward is ``layer_norm_bwd`` on the saved sum,
  plus the sum's own incoming gradient, which flows to both x and residual);
* ``cross_entropy`` (ops ``cross_entropy_fwd`` / ``cross_entropy_bwd``: logits (..., V) -> (N, V));
* ``linear_cross_entropy``: the shared chunk loop of kernels/_chunked_linear_ce.py with the CE ops on
  each (chunk_rows, V) logits chunk, so the (N, V) logits never exist;
* ``causal_attention`` (ops ``attention_fwd`` / ``attention_bwd``; section "causal attention" at the end);
* ``rope`` and ``swiglu`` (ops ``rope_fwd`` / ``rope_bwd``, ``swiglu_fwd`` / ``swiglu_bwd``): their own
  module, kernels/_cuda_rope_swiglu.py, imported at the end.

On a GPU every op first checks that the library holds code for the device's arch and, for attention,
that the device has compute capability 8.0+ (``gpu_unavailable_reason``): BackendUnavailableError with
the reason (and the rebuild command) instead of a failed launch.

Every op of the API is implemented.  float64 CUDA tensors go to the reference (the CUDA kernels take
fp32/fp16/bf16); on the CPU the C++ kernels take all four float dtypes.
"""
from __future__ import annotations

import math

import torch

from . import (
    _C,  # noqa: F401  (loading the library registers the ops)
    _chunked_linear_ce,
    reference,
)
from .backends import BackendUnavailableError, register

_ops = torch.ops.llm_kernels


# ---- which GPUs the library can run on -------------------------------------------------------------
# setup.py compiles the CUDA kernels for the visible GPU's arch (or TORCH_CUDA_ARCH_LIST, or CI's
# "7.5;8.0;9.0") and records the result in _C.cuda_archs: "sm_75,sm_80,sm_90", plus "compute_XY" for
# embedded PTX, "" in a CPU-only build.  A GPU is checked against it before the first launch, so a
# library without code for it says "rebuild" instead of failing with "no kernel image is available".

REBUILD = "pip install -e . --no-build-isolation --no-deps"
ATTENTION_MIN_CAPABILITY = (8, 0)  # mma.sync.m16n8k16 in fp16 and bf16 (csrc/attention_cuda.cuh)


def _device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (a function of its own so tests can fake a GPU)."""
    return torch.cuda.get_device_capability(device)


def _compiled_archs() -> str | None:
    """_C.cuda_archs, or None for a library built before the attribute existed (nothing to check against)."""
    return getattr(_C, "cuda_archs", None)


def _runs_on(targets: list[str], capability: tuple[int, int]) -> bool:
    """Whether code compiled for ``targets`` runs on a GPU of ``capability``: a cubin sm_XY runs on the
    same major version with minor >= Y (sm_80 on 8.6 and 8.9; an arch-specific sm_90a on 9.0 only), PTX
    compute_XY on anything from X.Y up (the driver compiles it)."""
    major, minor = capability
    for target in targets:
        kind, _, num = target.partition("_")
        exact = num.endswith("a")
        t_major, t_minor = divmod(int(num.rstrip("af")), 10)
        if kind == "compute" and (major, minor) >= (t_major, t_minor):
            return True
        if kind == "sm" and major == t_major and (minor == t_minor if exact else minor >= t_minor):
            return True
    return False


_gpu_reasons: dict[tuple[str, int, bool], str | None] = {}  # (op, device index, needs_sm80) -> the answer


@torch.compiler.assume_constant_result  # torch.compile runs it as Python and keeps the answer, untraced
def gpu_unavailable_reason(op: str, device: torch.device, needs_sm80: bool = False) -> str | None:
    """Why the extension's CUDA kernels cannot run ``op`` on CUDA ``device``, or None when they can.

    ``needs_sm80``: the op's kernels use mma.sync (attention): below compute capability 8.0 no rebuild
    helps.  Otherwise the library must hold code for the device's arch (``_runs_on``).  Cached per device.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (op, index, needs_sm80)
    if key not in _gpu_reasons:
        _gpu_reasons[key] = _gpu_reason(op, torch.device("cuda", index), needs_sm80)
    return _gpu_reasons[key]


def _gpu_reason(op: str, device: torch.device, needs_sm80: bool) -> str | None:
    capability = _device_capability(device)
    cap = f"{capability[0]}.{capability[1]}"
    if needs_sm80 and capability < ATTENTION_MIN_CAPABILITY:
        return (f"{op}: the cuda backend needs compute capability 8.0+ for its attention kernels (mma.sync "
                f"tensor-core instructions), and {device} has {cap}; use the torch or triton backend")
    compiled = _compiled_archs()
    if compiled is None:
        return None
    if not compiled:
        return (f"{op}: kernels._C was built without its CUDA kernels (no GPU visible at build time, "
                f"LLM_SKIP_CUDA_BUILD=1, a CPU-only torch or no CUDA toolkit); rebuild it on this machine: {REBUILD}")
    targets = compiled.split(",")
    if not _runs_on(targets, capability):
        return (f"{op}: kernels._C was compiled for {', '.join(targets)}, which cannot run on {device} "
                f"(compute capability {cap}); rebuild it for this GPU: {REBUILD} "
                f"(setup.py builds for the visible GPUs; or TORCH_CUDA_ARCH_LIST={cap})")
    return None


def _check_gpu(device: torch.device, op: str, needs_sm80: bool = False) -> None:
    """Raise BackendUnavailableError when ``device`` is a GPU the extension's kernels cannot run ``op`` on."""
    if device.type == "cuda":
        reason = gpu_unavailable_reason(op, device, needs_sm80)
        if reason:
            raise BackendUnavailableError(reason)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("llm_kernels::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps):
    torch._check(x.dim() == 2, lambda: f"layer_norm_fwd: x must be 2-D (M, C), got shape {tuple(x.shape)}")
    M = x.shape[0]
    stats = _stats_dtype(x.dtype)
    # y (M, C) contiguous in x's dtype; mean, rstd (M,)
    return x.new_empty(x.shape), x.new_empty((M,), dtype=stats), x.new_empty((M,), dtype=stats)


@torch.library.register_fake("llm_kernels::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, weight, mean, rstd):
    torch._check(x.dim() == 2, lambda: f"layer_norm_bwd: x must be 2-D (M, C), got shape {tuple(x.shape)}")
    # dx (M, C) in x's dtype; dweight, dbias (C,) in weight's dtype
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _ops.layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, dweight, dbias, None


torch.library.register_autograd(
    "llm_kernels::layer_norm_fwd", _layer_norm_backward, setup_context=_layer_norm_setup_context
)


@register("cuda", "layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm by the extension's kernels; inputs already validated by the public API.

    weight and bias are cast to x's dtype (the kernels take one dtype; the cast's own backward
    returns their gradients in the parameters' dtype).  Returns x's shape and dtype.
    """
    if x.device.type == "cuda" and x.dtype == torch.float64:
        return reference.layer_norm(x, weight, bias, eps)
    _check_gpu(x.device, "layer_norm")
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (M, C)
    y, _mean, _rstd = _ops.layer_norm_fwd(x2, weight.to(x.dtype), bias.to(x.dtype), float(eps))
    return y.view(x.shape)  # (..., C)


# ---- add_layer_norm and cross-entropy ------------------------------------------------------------


@torch.library.register_fake("llm_kernels::add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    torch._check(x.dim() == 2, lambda: f"add_layer_norm_fwd: x must be 2-D (M, C), got shape {tuple(x.shape)}")
    M = x.shape[0]
    stats = _stats_dtype(x.dtype)
    # y, sum (M, C) contiguous in x's dtype; mean, rstd (M,)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((M,), dtype=stats), x.new_empty((M,), dtype=stats)


def _add_layer_norm_setup_context(ctx, inputs, output):
    _x, _residual, weight, _bias, _eps = inputs
    _y, total, mean, rstd = output
    ctx.save_for_backward(total, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dy, dsum, _dmean, _drstd):
    # autograd hands an unused output's gradient over as zeros, so dy and dsum are both tensors
    total, weight, mean, rstd = ctx.saved_tensors
    dtotal, dweight, dbias = _ops.layer_norm_bwd(dy, total, weight, mean, rstd)
    dtotal = dtotal + dsum  # sum = x + residual: its gradient is that of both x and residual
    return dtotal, dtotal, dweight, dbias, None


torch.library.register_autograd(
    "llm_kernels::add_layer_norm_fwd", _add_layer_norm_backward, setup_context=_add_layer_norm_setup_context
)


@register("cuda", "add_layer_norm")
def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)`` by one kernel that reads x and residual once.

    Inputs already validated by the public API (x and residual share shape and dtype); weight and
    bias are cast to x's dtype as in ``layer_norm``.  Both outputs have x's shape and dtype.
    """
    if x.device.type == "cuda" and x.dtype == torch.float64:
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    _check_gpu(x.device, "add_layer_norm")
    C = x.shape[-1]
    y, total, _mean, _rstd = _ops.add_layer_norm_fwd(
        x.reshape(-1, C), residual.reshape(-1, C), weight.to(x.dtype), bias.to(x.dtype), float(eps)  # (M, C)
    )
    return y.view(x.shape), total.view(x.shape)  # (..., C)


@torch.library.register_fake("llm_kernels::cross_entropy_fwd")
def _cross_entropy_fwd_fake(logits, targets, ignore_index):
    torch._check(logits.dim() == 2, lambda: f"cross_entropy_fwd: logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    stats = _stats_dtype(logits.dtype)
    # loss 0-d; stats (N, 2): each row's max and log-sum, kept apart (see csrc/cross_entropy_cpu.cpp)
    return logits.new_empty((), dtype=stats), logits.new_empty((logits.shape[0], 2), dtype=stats)


@torch.library.register_fake("llm_kernels::cross_entropy_bwd")
def _cross_entropy_bwd_fake(dloss, logits, targets, stats, ignore_index):
    torch._check(logits.dim() == 2, lambda: f"cross_entropy_bwd: logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    return logits.new_empty(logits.shape)  # dlogits (N, V) contiguous in logits' dtype


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _loss, stats = output
    ctx.save_for_backward(logits, targets, stats)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(stats)


def _cross_entropy_backward(ctx, dloss, _dstats):
    logits, targets, stats = ctx.saved_tensors
    return _ops.cross_entropy_bwd(dloss, logits, targets, stats, ctx.ignore_index), None, None


torch.library.register_autograd(
    "llm_kernels::cross_entropy_fwd", _cross_entropy_backward, setup_context=_cross_entropy_setup_context
)


@register("cuda", "cross_entropy")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), by the extension's kernels.

    Inputs already validated by the public API.  Returns a float32 scalar (float64 for float64 logits).
    The backward keeps the logits (no (N, V) gradient is stored between forward and backward).
    """
    if logits.device.type == "cuda" and logits.dtype == torch.float64:
        return reference.cross_entropy(logits, targets, ignore_index)
    _check_gpu(logits.device, "cross_entropy")
    V = logits.shape[-1]
    _chunked_linear_ce.check_targets(targets, V, ignore_index)  # on a GPU: an error, not a NaN loss
    loss, _stats = _ops.cross_entropy_fwd(logits.reshape(-1, V), targets.reshape(-1).long(), int(ignore_index))  # (N, V), (N,)
    return loss


def _chunk_ce(logits, targets, ignore_index, need_grad):
    """The chunk kernel of the shared linear-CE loop: summed loss and softmax - onehot (scale 1)."""
    loss, stats = _ops.cross_entropy_fwd(logits, targets, ignore_index)
    n_valid = (targets != ignore_index).sum().to(loss.dtype)  # on the device: no host sync
    # the op returns the chunk's mean; dloss = n_valid makes its gradient scale dloss / n_valid exactly 1
    dlogits = _ops.cross_entropy_bwd(n_valid, logits, targets, stats, ignore_index) if need_grad else None
    return loss * n_valid, dlogits


def linear_cross_entropy_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``linear_cross_entropy`` with an explicit chunk size (rows of logits formed at a time)."""
    if hidden.device.type == "cuda" and hidden.dtype == torch.float64:
        return reference.linear_cross_entropy(hidden, weight, targets, ignore_index)
    _check_gpu(hidden.device, "linear_cross_entropy")
    return _chunked_linear_ce.linear_cross_entropy_chunked(
        _chunk_ce, hidden, weight, targets.long(), int(ignore_index), chunk_rows
    )


@register("cuda", "linear_cross_entropy")
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` without ever forming the (N, V) logits."""
    return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index)


# ============================================================================ causal attention
# Ops attention_fwd(q, k, v, scale) -> (out, lse) and attention_bwd(dout, q, k, v, out, lse, scale) ->
# (dq, dk, dv) (csrc/ops.cpp, csrc/attention_cpu.cpp, csrc/attention_cuda.cu, attention_bwd_cuda.cu).  On the CPU the C++
# kernels take every float dtype and any head dim; on CUDA the tensor-core kernels take fp16/bf16 with
# D in CUDA_ATTENTION_HEAD_DIMS.  k, v may have fewer heads than q (grouped-query attention, H % H_kv == 0):
# the kernels read k/v head h // (H / H_kv) in place, and dk, dv come back in k/v's shape, summed over
# each group.


CUDA_ATTENTION_HEAD_DIMS = (64, 128)


@torch.library.register_fake("llm_kernels::attention_fwd")
def _attention_fwd_fake(q, k, v, scale):
    torch._check(q.dim() == 4, lambda: f"attention_fwd: q must be 4-D (B, H, Tq, D), got shape {tuple(q.shape)}")
    torch._check(k.dim() == 4 and q.shape[1] % k.shape[1] == 0,
                 lambda: f"attention_fwd: q's heads must be a multiple of k/v's, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    B, H, Tq, _D = q.shape
    # out (B, H, Tq, D) contiguous in q's dtype; lse (B, H, Tq) in float32 (float64 for float64 q)
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=_stats_dtype(q.dtype))


@torch.library.register_fake("llm_kernels::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, scale):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "attention_bwd: q, k and v must be 4-D (B, H, T, D)")
    # dq like q (B, H, Tq, D); dk, dv like k, v (B, H_kv, Tk, D), summed over each group; all contiguous
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd(
    "llm_kernels::attention_fwd", _attention_backward, setup_context=_attention_setup_context
)


@register("cuda", "causal_attention")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention by the extension's kernels; inputs already validated by the public API.

    q, k, v are made contiguous here, deliberately: the kernels read (B, H, T, D) rows, and the model's
    q/k/v are strided views of one fused QKV projection (one copy each, the same one the reference's
    matmuls would make).  k, v with H_kv < H heads (GQA) are copied at their own size, never repeated.
    On CUDA: float64 runs the reference (as layer_norm does); a GPU below compute capability 8.0,
    float32, or a head dim the kernels are not built for, raises BackendUnavailableError naming what is
    supported.
    """
    D = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            return reference.causal_attention(q, k, v, scale)
        _check_gpu(q.device, "causal_attention", needs_sm80=True)
        if q.dtype == torch.float32:
            raise BackendUnavailableError(
                "causal_attention: the cuda backend's CUDA kernels run on tensor cores and take float16 or "
                "bfloat16, got float32 (use bf16 autocast, or the torch/triton backend)"
            )
        if D not in CUDA_ATTENTION_HEAD_DIMS:
            raise BackendUnavailableError(
                f"causal_attention: the cuda backend's CUDA kernels support head dims "
                f"{', '.join(map(str, CUDA_ATTENTION_HEAD_DIMS))}, got D={D} (use the torch or triton backend)"
            )
    out, _lse = _ops.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), sm_scale)
    return out  # (B, H, Tq, D)


from ._cuda_rope_swiglu import rope, swiglu  # noqa: E402,F401  (RoPE and SwiGLU: their own module)
from ._cuda_rmsnorm import add_rms_norm, rms_norm  # noqa: E402,F401  (RMSNorm: its own module)
