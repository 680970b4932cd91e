"""The "cuda" backend's ``rms_norm`` and ``add_rms_norm``: the extension's RMSNorm ops on the Python side.

Loading ``kernels._C`` registers the ops (csrc/rms_norm_ops.cpp; CPU kernels in rms_norm_cpu.cpp, CUDA
kernels in rms_norm_cuda.cu):

* ``rms_norm_fwd(x, weight, eps) -> (y, rstd)``: x (..., C), weight (C,) in x's dtype or float32; y like x,
  rstd (...) one per row, float32 (float64 for float64 x);
* ``add_rms_norm_fwd(x, residual, weight, eps) -> (y, sum, rstd)``: sum = x + residual in x's dtype, y its RMSNorm;
* ``rms_norm_bwd(dy, x, weight, rstd, dsum) -> (dx, dweight)``: dx plus the optional dsum (the add
  variant's sum gradient, added in the same pass), dweight in weight's dtype.

The ops take x in its own shape (unlike the 2-D LayerNorm ops): a ``reshape`` in front of the op
would put a view node per input into the graph, and the two views of the one gradient that backward
returns for x and residual would then both be stolen as .grad, two leaves aliasing one buffer.

This module adds their fake (meta) implementations, so ``torch.compile`` / FakeTensor tracing know the
output shapes without running a kernel, the autograd formulas of the two forward ops (their backward is
``rms_norm_bwd``, registered with ``torch.library.register_autograd`` so torch.compile traces through it
without a graph break), and the backend's two ops.  kernels/_cuda_backend.py imports it at its end
(so ``_cuda_backend.rms_norm`` is the registered op, as for the others); it uses that module's GPU check.

weight is passed as it is when it has x's dtype or is float32 (fp32 parameters beside bf16 activations
are read at full precision); any other dtype is cast to float32 first (the cast's backward returns its
gradient in the parameter's dtype).  float64 CUDA tensors go to the reference (the CUDA kernels take
fp32/fp16/bf16); on the CPU the C++ kernels take all four float dtypes.  A library built from older
sources, without these ops, does not break the backend's other ops: these two then raise
BackendUnavailableError saying to rebuild it.
"""
from __future__ import annotations

import torch

from . import (
    _C,  # noqa: F401  (loading the library registers the ops)
    reference,
)
from .backends import BackendUnavailableError, register

_ops = torch.ops.llm_kernels
_BUILT = hasattr(_ops, "rms_norm_fwd")  # False for a kernels._C compiled before csrc/rms_norm_*.cpp existed
_STALE = ("kernels._C was built before its RMSNorm ops (csrc/rms_norm_ops.cpp) existed; rebuild it: "
          "pip install -e . --no-build-isolation --no-deps")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fake(name):
    return torch.library.register_fake(name) if _BUILT else (lambda fn: fn)


def _register_autograd(name, backward, setup_context):
    if _BUILT:
        torch.library.register_autograd(name, backward, setup_context=setup_context)


@_register_fake("llm_kernels::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps):
    torch._check(x.dim() >= 1, lambda: f"rms_norm_fwd: x must be (..., C), got shape {tuple(x.shape)}")
    # y (..., C) contiguous in x's dtype; rstd (...)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))


@_register_fake("llm_kernels::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(x, residual, weight, eps):
    torch._check(x.dim() >= 1, lambda: f"add_rms_norm_fwd: x must be (..., C), got shape {tuple(x.shape)}")
    # y, sum (..., C) contiguous in x's dtype; rstd (...)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))


@_register_fake("llm_kernels::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, x, weight, rstd, dsum):
    torch._check(x.dim() >= 1, lambda: f"rms_norm_bwd: x must be (..., C), got shape {tuple(x.shape)}")
    # dx (..., C) contiguous in x's dtype; dweight (C,) in weight's dtype
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _ops.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, dweight, None


_register_autograd("llm_kernels::rms_norm_fwd", _rms_norm_backward, _rms_norm_setup_context)


def _add_rms_norm_setup_context(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _y, total, rstd = output
    ctx.save_for_backward(total, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _add_rms_norm_backward(ctx, dy, dsum, _drstd):
    # autograd hands an unused output's gradient over as zeros, so dy and dsum are both tensors;
    # sum = x + residual, so the one gradient (dsum added in the kernel) is that of both inputs
    total, weight, rstd = ctx.saved_tensors
    dtotal, dweight = _ops.rms_norm_bwd(dy, total, weight, rstd, dsum)
    return dtotal, dtotal, dweight, None


_register_autograd("llm_kernels::add_rms_norm_fwd", _add_rms_norm_backward, _add_rms_norm_setup_context)


def _weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight as the kernels take it: in x's dtype or float32 as it is, anything else cast to float32."""
    return weight if weight.dtype in (x.dtype, torch.float32) else weight.to(torch.float32)


@register("cuda", "rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm by the extension's kernels; inputs already validated by the public API.  Returns x's
    shape and dtype."""
    if not _BUILT:
        raise BackendUnavailableError(f"rms_norm: {_STALE}")
    if x.device.type == "cuda" and x.dtype == torch.float64:
        return reference.rms_norm(x, weight, eps)
    _cuda_backend._check_gpu(x.device, "rms_norm")
    y, _rstd = _ops.rms_norm_fwd(x, _weight(weight, x), float(eps))  # (..., C), (...)
    return y


@register("cuda", "add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` by one kernel that reads x and residual once.

    Inputs already validated by the public API (x and residual share shape and dtype).  Both outputs
    have x's shape and dtype.
    """
    if not _BUILT:
        raise BackendUnavailableError(f"add_rms_norm: {_STALE}")
    if x.device.type == "cuda" and x.dtype == torch.float64:
        return reference.add_rms_norm(x, residual, weight, eps)
    _cuda_backend._check_gpu(x.device, "add_rms_norm")
    y, total, _rstd = _ops.add_rms_norm_fwd(x, residual, _weight(weight, x), float(eps))  # (..., C) x 2, (...)
    return y, total


# Last, so that this module works whichever of the two is imported first: _cuda_backend imports this
# module at its end, and the functions above read _cuda_backend._check_gpu only when called.
from . import _cuda_backend  # noqa: E402
