"""The "cuda" backend's rope and swiglu: the ops ``torch.ops.llm_kernels.rope_fwd`` / ``rope_bwd`` and
``swiglu_fwd`` / ``swiglu_bwd`` of the extension (csrc/rope_swiglu_cpu.cpp declares them with their CPU
kernels, csrc/rope_swiglu_cuda.cu holds the CUDA ones).

What torch needs on the Python side, as kernels/_cuda_backend.py does for the other ops:

* a fake (meta) implementation of each op, so ``torch.compile`` / FakeTensor tracing know the output
  shapes (every output is a fresh contiguous tensor of the input's shape and dtype);
* the autograd formulas (``torch.library.register_autograd``): rope's backward is ``rope_bwd``, the
  inverse rotation of the incoming gradient; cos and sin get **no gradient** (they are a fixed table of
  angles, not parameters: None is returned for them, also when they require grad); swiglu's backward is
  ``swiglu_bwd``, which recomputes sigmoid(gate) from the saved inputs;
* the backend's ``rope`` and ``swiglu``.  float64 CUDA tensors go to the reference (the CUDA kernels
  take fp32/fp16/bf16); on the CPU the C++ kernels take all four float dtypes.

x, gate and up are passed as they are: the kernels read any B/H/T strides of x (q and k are views of a
fused QKV projection) and any row strides of gate/up, copying only a last dim that is not unit-stride.

Imported at the end of kernels/_cuda_backend.py (which re-exports ``rope`` and ``swiglu``); this module
imports that one only at its own end, after defining both, so either may be imported first.
"""
from __future__ import annotations

import torch

from . import (
    _C,  # noqa: F401  (loading the library registers the ops)
    reference,
)
from .backends import BackendUnavailableError, register

_ops = torch.ops.llm_kernels
OPS = ("rope_fwd", "rope_bwd", "swiglu_fwd", "swiglu_bwd")
# A kernels._C built from sources older than these ops (the package updated, the library not rebuilt).
MISSING = [name for name in OPS if not hasattr(_ops, name)]
REBUILD = "pip install -e . --no-build-isolation --no-deps"


def _check(device: torch.device, op: str) -> None:
    """BackendUnavailableError when the library lacks these ops or cannot run on ``device`` (a GPU)."""
    if MISSING:
        raise BackendUnavailableError(
            f"{op}: kernels._C predates its ops {', '.join(MISSING)} (built from older sources); rebuild it: {REBUILD}"
        )
    _cuda_backend._check_gpu(device, op)


if not MISSING:

    @torch.library.register_fake("llm_kernels::rope_fwd")
    def _rope_fwd_fake(x, cos, sin):
        torch._check(x.dim() == 4, lambda: f"rope_fwd: x must be 4-D (B, H, T, D), got shape {tuple(x.shape)}")
        return x.new_empty(x.shape)  # y (B, H, T, D) contiguous in x's dtype

    @torch.library.register_fake("llm_kernels::rope_bwd")
    def _rope_bwd_fake(dy, cos, sin):
        torch._check(dy.dim() == 4, lambda: f"rope_bwd: dy must be 4-D (B, H, T, D), got shape {tuple(dy.shape)}")
        return dy.new_empty(dy.shape)  # dx (B, H, T, D) contiguous

    def _rope_setup_context(ctx, inputs, output):
        _x, cos, sin = inputs
        ctx.save_for_backward(cos, sin)

    def _rope_backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dx = _ops.rope_bwd(dy, cos, sin) if ctx.needs_input_grad[0] else None
        return dx, None, None  # cos, sin: a fixed table, no gradient

    torch.library.register_autograd("llm_kernels::rope_fwd", _rope_backward, setup_context=_rope_setup_context)

    @torch.library.register_fake("llm_kernels::swiglu_fwd")
    def _swiglu_fwd_fake(gate, up):
        return gate.new_empty(gate.shape)  # y contiguous, gate's shape and dtype

    @torch.library.register_fake("llm_kernels::swiglu_bwd")
    def _swiglu_bwd_fake(dy, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)  # dgate, dup contiguous

    def _swiglu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # gate, up: the backward recomputes sigmoid(gate)

    def _swiglu_backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = _ops.swiglu_bwd(dy, gate, up)
        return dgate, dup

    torch.library.register_autograd("llm_kernels::swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup_context)


@register("cuda", "rope")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, D) by cos, sin (T, D/2) float32, by the extension's kernels; inputs
    already validated by the public API.  Returns a contiguous (B, H, T, D) tensor in x's dtype; cos and
    sin get no gradient."""
    if x.device.type == "cuda" and x.dtype == torch.float64:
        return reference.rope(x, cos, sin)
    _check(x.device, "rope")
    return _ops.rope_fwd(x, cos, sin)


@register("cuda", "swiglu")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` by the extension's kernels (one pass: reads gate and up, writes the result);
    inputs already validated by the public API.  Returns a contiguous tensor of gate's shape and dtype."""
    if gate.device.type == "cuda" and gate.dtype == torch.float64:
        return reference.swiglu(gate, up)
    _check(gate.device, "swiglu")
    return _ops.swiglu_fwd(gate, up)


from . import _cuda_backend  # noqa: E402  (last: it imports rope and swiglu from here; see the docstring)
