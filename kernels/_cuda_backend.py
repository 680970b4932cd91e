"""The "cuda" backend: the ops of the C++/CUDA extension ``kernels._C`` (sources in csrc/).

Imported by ``backends._load_backend("cuda")`` once ``from . import _C`` succeeded; loading ``_C``
registers the ops ``torch.ops.llm_kernels.layer_norm_fwd`` / ``layer_norm_bwd`` (schemas and CPU/CUDA
kernels, csrc/ops.cpp).  This module adds what torch needs on the Python side:

* a fake (meta) implementation of each op, so ``torch.compile`` / FakeTensor tracing know the output
  shapes without running a kernel;
* the autograd formula of ``layer_norm_fwd`` (its backward is the ``layer_norm_bwd`` op), registered
  with ``torch.library.register_autograd`` so torch.compile traces through it without a graph break;
* the backend's ``layer_norm``: (..., C) -> (M, C) rows, the op, and back to x's shape.

Only ``layer_norm`` is implemented so far; for the other ops the backend reports "no cuda
implementation of <op>".  float64 CUDA tensors go to the reference (the CUDA kernels take
fp32/fp16/bf16); on the CPU the C++ kernels take all four float dtypes.
"""
from __future__ import annotations

import torch

from . import (
    _C,  # noqa: F401  (loading the library registers the ops)
    reference,
)
from .backends import register

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
