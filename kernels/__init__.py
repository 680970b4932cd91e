"""The op API of the GPT (GPT-2, Llama 3, Qwen3): attention, the norms, RoPE, SwiGLU and the loss,
each with interchangeable backends.

    kernels.causal_attention(q, k, v, scale=None)               # k, v may have fewer heads: GQA / MQA
    kernels.layer_norm(x, weight, bias, eps=1e-5)
    kernels.add_layer_norm(x, residual, weight, bias, eps=1e-5)   # -> (layer_norm(x + residual), x + residual)
    kernels.rms_norm(x, weight, eps=1e-6)
    kernels.add_rms_norm(x, residual, weight, eps=1e-6)           # -> (rms_norm(x + residual), x + residual)
    kernels.rope(x, cos, sin)                                     # rotary position embedding, "rotate half"
    kernels.swiglu(gate, up)                                      # silu(gate) * up
    kernels.cross_entropy(logits, targets, ignore_index=-100)
    kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=-100)
    kernels.set_backend(name) / kernels.get_backend() / with kernels.backend(name): ...

Every call validates its inputs (a TypeError or ValueError that names the argument and what it got),
then runs the backend chosen in ``kernels/backends.py``.  Importing this package needs neither a GPU
nor a compiled extension.
"""
from __future__ import annotations

import torch

from . import _validate, reference
from .backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend,
    get_backend,
    resolve,
    set_backend,
)

__all__ = [
    "causal_attention",
    "layer_norm",
    "add_layer_norm",
    "rms_norm",
    "add_rms_norm",
    "rope",
    "swiglu",
    "cross_entropy",
    "linear_cross_entropy",
    "set_backend",
    "get_backend",
    "backend",
    "available_backends",
    "BackendUnavailableError",
    "BACKENDS",
    "reference",
]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention ``softmax(q k^T * scale + mask) v``.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with Tq <= Tk and H a multiple of H_kv; all one dtype and
    device.  H_kv < H is grouped-query attention (H_kv = 1: multi-query): query head h reads k/v head
    h // (H / H_kv), as Hugging Face's ``repeat_kv`` lays them out, and no backend repeats k and v in
    memory except the reference.  The causal mask is aligned bottom-right: query i sees keys
    0..i + Tk - Tq, so Tq < Tk serves KV-cache decoding.  ``scale`` defaults to 1/sqrt(D).  Returns
    (B, H, Tq, D) in q's dtype.
    """
    _validate.check_attention(q, k, v, scale)
    return resolve("causal_attention", q.device, q)(q, k, v, scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (..., C) with weight and bias of shape (C,); returns x's dtype."""
    _validate.check_layer_norm(x, weight, bias, eps)
    return resolve("layer_norm", x.device, x)(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with LayerNorm: returns ``(layer_norm(x + residual), x + residual)``.

    x, residual: (..., C), same shape, dtype and device; weight, bias: (C,).  Both outputs in x's dtype.
    """
    _validate.check_add_layer_norm(x, residual, weight, bias, eps)
    return resolve("add_layer_norm", x.device, x)(x, residual, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x**2, -1) + eps) * weight`` (Llama, Qwen).

    x: (..., C); weight: (C,).  Statistics in fp32 whatever x's dtype; returns x's dtype.
    """
    _validate.check_rms_norm(x, weight, eps)
    return resolve("rms_norm", x.device, x)(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with RMSNorm: returns ``(rms_norm(x + residual), x + residual)``, both in x's dtype."""
    _validate.check_add_rms_norm(x, residual, weight, eps)
    return resolve("add_rms_norm", x.device, x)(x, residual, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, H, T, D) with cos, sin (T, D/2) float32 for its T positions.

    "Rotate half", as Hugging Face's Llama and Qwen3: with x1, x2 = x[..., :D/2], x[..., D/2:] the result
    is ``cat(x1*cos - x2*sin, x2*cos + x1*sin)``, pair (x1_i, x2_i) turned by the angle whose cos and
    sin are column i.  Computed in fp32; returns x's dtype.  For decoding, pass the rows of cos and sin
    of the new positions (offset by the cache length).
    """
    _validate.check_rope(x, cos, sin)
    return resolve("rope", x.device, x)(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP's gate: ``silu(gate) * up`` = ``gate * sigmoid(gate) * up``, same-shaped inputs,
    computed in fp32, returned in gate's dtype."""
    _validate.check_swiglu(gate, up)
    return resolve("swiglu", gate.device, gate)(gate, up)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) (or (..., V)) against integer targets (N,) (or (...)).

    Targets equal to ``ignore_index`` are skipped and the mean is over the others (0 when all are
    ignored).  Returns a float32 scalar (float64 for float64 logits).
    """
    _validate.check_cross_entropy(logits, targets, ignore_index)
    return resolve("cross_entropy", logits.device, logits)(logits, targets, ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)``: the LM head and the loss as one op.

    hidden: (N, C) (or (..., C)); weight: (V, C), same dtype as hidden; targets: (N,) (or (...)).
    Backends that fuse it never materialize the (N, V) logits.
    """
    _validate.check_linear_cross_entropy(hidden, weight, targets, ignore_index)
    return resolve("linear_cross_entropy", hidden.device, hidden, weight)(hidden, weight, targets, ignore_index)
