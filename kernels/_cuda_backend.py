"""The "cuda" backend: the ops of the C++/CUDA extension ``kernels._C`` (sources in csrc/).

Imported by ``backends._load_backend("cuda")`` once ``from . import _C`` succeeded; loading ``_C``
registers the ops ``torch.ops.llm_kernels.layer_norm_fwd`` / ``layer_norm_bwd`` (schemas and CPU/CUDA
kernels, csrc/ops.cpp).  This module adds what torch needs on the Python side:

* a fake (meta) implementation of each op, so ``torch.compile`` / FakeTensor tracing know the output
  shapes without running a kernel;
* the autograd formula of ``layer_norm_fwd`` (its backward is the ``layer_norm_bwd`` op), registered
  with ``torch.library.register_autograd`` so torch.compile traces through it without a graph break;
* the backend's ``layer_norm``: (..., C) -> (M, C) rows, the op, and back to x's shape;
* the same for ``attention_fwd`` / ``attention_bwd`` and the backend's ``causal_attention`` (section
  "causal attention" at the end).

For the ops not implemented here the backend reports "no cuda implementation of <op>".  float64 CUDA tensors go to the reference (the CUDA kernels take
fp32/fp16/bf16); on the CPU the C++ kernels take all four float dtypes.
"""
from __future__ import annotations

import math

import torch

from . import (
    _C,  # noqa: F401  (loading the library registers the ops)
    reference,
)
from .backends import BackendUnavailableError, register

_ops = torch.ops.llm_kernels


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
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (M, C)
    y, _mean, _rstd = _ops.layer_norm_fwd(x2, weight.to(x.dtype), bias.to(x.dtype), float(eps))
    return y.view(x.shape)  # (..., C)


# ============================================================================ causal attention
# Ops attention_fwd(q, k, v, scale) -> (out, lse) and attention_bwd(dout, q, k, v, out, lse, scale) ->
# (dq, dk, dv) (csrc/ops.cpp, csrc/attention_cpu.cpp, csrc/attention_cuda.cu, attention_bwd_cuda.cu).  On the CPU the C++
# kernels take every float dtype and any head dim; on CUDA the tensor-core kernels take fp16/bf16 with
# D in CUDA_ATTENTION_HEAD_DIMS.


CUDA_ATTENTION_HEAD_DIMS = (64, 128)


@torch.library.register_fake("llm_kernels::attention_fwd")
def _attention_fwd_fake(q, k, v, scale):
    torch._check(q.dim() == 4, lambda: f"attention_fwd: q must be 4-D (B, H, Tq, D), got shape {tuple(q.shape)}")
    B, H, Tq, _D = q.shape
    # out (B, H, Tq, D) contiguous in q's dtype; lse (B, H, Tq) in float32 (float64 for float64 q)
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=_stats_dtype(q.dtype))


@torch.library.register_fake("llm_kernels::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, scale):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "attention_bwd: q, k and v must be 4-D (B, H, T, D)")
    # dq like q (B, H, Tq, D); dk, dv like k, v (B, H, Tk, D); all contiguous
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
    matmuls would make).  On CUDA: float64 runs the reference (as layer_norm does); float32, or a head
    dim the kernels are not built for, raises BackendUnavailableError naming what is supported.
    """
    D = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            return reference.causal_attention(q, k, v, scale)
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
