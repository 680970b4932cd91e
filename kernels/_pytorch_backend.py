"""The "pytorch" backend: PyTorch's own fused ops, the baseline our kernels have to beat.

This is how nanoGPT builds a GPT: ``F.scaled_dot_product_attention`` (flash / memory-efficient /
cuDNN kernels on a GPU; ``enable_gqa`` for k/v with fewer heads), ``F.layer_norm`` and ``F.cross_entropy``
on materialized logits; and how Hugging Face's Llama runs: ``F.rms_norm``, ``F.silu(gate) * up``, RoPE as
``x * cos + rotate_half(x) * sin``.  It is not
the oracle -- that is the plain "torch" reference in ``reference.py``, which spells every step out in
fp32 -- but the best a PyTorch user gets without writing a kernel; ``bench/train.py`` trains with it
(plus ``torch.compile`` and fused AdamW) as the "PyTorch-native" baseline.

Semantics match the reference, with two details PyTorch's ops do differently handled here:

* SDPA's ``is_causal`` aligns the mask top-left; with ``Tq < Tk`` (KV-cache decoding) the
  reference's bottom-right mask is passed explicitly instead.
* Non-finite attention inputs are left to SDPA, as a PyTorch user gets it: a NaN in a later value
  vector may reach every earlier row through its masked 0 * nan, unlike the reference and "cuda"
  (exact) and "triton" (at most 127 rows back; see ``reference.causal_attention``).  Making SDPA follow would cost this baseline extra passes over
  q, k and v that PyTorch's users do not pay, and the benchmarks would flatter us.
* ``F.cross_entropy`` with every target ignored returns 0/0 = nan; the reference returns 0, so the
  mean is taken here as ``sum / max(count, 1)``.
* ``F.cross_entropy`` takes int64 targets only; the API also accepts int32, which is widened here.

Outputs are in the inputs' dtype (the loss in fp32), computed the way PyTorch computes them, so in
bf16 these carry PyTorch's own low-precision error -- exactly the yardstick the tests hold us to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import register


@register("pytorch", "causal_attention")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # k/v with fewer heads (SDPA's GQA)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    # bottom-right: query i sees keys j <= i + (Tk - Tq)
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, **gqa)


@register("pytorch", "layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)


@register("pytorch", "add_layer_norm")
def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual  # (..., C)
    return layer_norm(total, weight, bias, eps), total


@register("pytorch", "rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


@register("pytorch", "add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual  # (..., C)
    return rms_norm(total, weight, eps), total


@register("pytorch", "rope")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # PyTorch has no fused RoPE: this is Hugging Face's apply_rotary_pos_emb, x * cos + rotate_half(x) * sin,
    # with cos and sin duplicated to the full head dim, in x's dtype.
    cos, sin = torch.cat([cos, cos], dim=-1).to(x.dtype), torch.cat([sin, sin], dim=-1).to(x.dtype)  # (T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, T, D)
    return x * cos + rotated * sin


@register("pytorch", "swiglu")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@register("pytorch", "cross_entropy")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    targets = targets.reshape(-1).long()  # (N,); F.cross_entropy takes int64 class ids only, the API int32 too
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # as autocast does for F.cross_entropy
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count


@register("pytorch", "linear_cross_entropy")
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # (..., V), materialized: this is what the fused kernels avoid
    return cross_entropy(logits, targets, ignore_index)
