# Rotary position embedding in Triton: the "triton" backend's rope.
#
# Algorithm ("rotate half", Hugging Face Llama / Qwen3 layout)
#   x (B, H, T, D) is D/2 planes per position: plane i holds (x1_i, x2_i) = (x[..., i], x[..., D/2 + i]),
#   turned by the angle whose cos and sin are cos[t, i], sin[t, i]:
#       y1 = x1*cos - x2*sin,   y2 = x2*cos + x1*sin.
#   One kernel, a 2-D tile per program: BLOCK_T positions x BLOCK_D planes of one (b, h), both halves
#   of x loaded, the tile of cos and sin (fp32) loaded once for both, fp32 math (fp64 for fp64 x), one
#   cast on store.  The grid is flat: program p is (head bh, position block, plane block) with bh the
#   fastest index, so programs that run together share the same rows of cos and sin (L2 hits) and, for
#   the model's q/k (views of a fused (B, T, H, D) projection), read neighbouring memory.
#
# VJP
#   The rotation R(theta) is orthogonal, so the VJP is the transpose, the rotation by -theta:
#       dx1 = dy1*cos + dy2*sin,   dx2 = dy2*cos - dy1*sin,
#   which is the same kernel with sin negated (INVERSE=True) run on dy.  cos and sin get no gradient:
#   they are a fixed table of angles (the backward returns None for them).
#
# Bytes moved (b = bytes per element of x, N = B*H*T*D)
#   fwd: read x, write y = 2*N*b;  bwd: read dy, write dx = 2*N*b.  cos and sin (T*D/2*4 bytes each)
#   are read once per (b, h) tile, mostly from L2: noise next to x when B*H >> 1.
#
# Limits
#   * x may have any strides in B, H and T (the model passes q and k as transposed views of its fused
#     QKV projection, read in place); a head dim that is not unit-stride is made contiguous first, as
#     are cos/sin columns (a row stride is fine: rows sliced at a KV-cache offset are read in place).
#   * y and dx are fresh contiguous (B, H, T, D) tensors; offsets are int64.
#   * Any even D: planes are masked to D/2; plane blocks of at most MAX_BLOCK_D.  D/2 is a constexpr
#     (one compile per head dim) so that x2 = x1 + D/2 is known to be 16-byte aligned when D/2 is a
#     multiple of 8: 16-byte loads at D = 80 too, not only at multiples of 32.
#   * fp16/bf16/fp32 are computed in fp32, fp64 in fp64 (as the reference).  On the CPU this runs
#     under TRITON_INTERPRET=1 (slow; bf16 is not emulated correctly there).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backends import register

MAX_BLOCK_D = 128  # planes per program (D/2 = 64 for D = 128 fits one block)
TILE = 2048  # planes per program, BLOCK_T * BLOCK_D (the tile is loaded twice: x1 and x2)


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    BH, H, T, n_dblk, n_tblk,
    stride_xb, stride_xh, stride_xt, stride_ct, stride_st,
    HALF: tl.constexpr, INVERSE: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid % BH  # the head, fastest: neighbouring programs share rows of cos/sin
    rest = pid // BH
    dblk = rest % n_dblk
    tblk = rest // n_dblk
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tblk * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    t64 = t.to(tl.int64)[:, None]
    x_off = b * stride_xb + h * stride_xh + t64 * stride_xt + d[None, :]  # (BLOCK_T, BLOCK_D), x1
    if IS_FP64:
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float64)
        x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float64)
        c = tl.load(COS + t64 * stride_ct + d[None, :], mask=mask, other=0.0).to(tl.float64)
        s = tl.load(SIN + t64 * stride_st + d[None, :], mask=mask, other=0.0).to(tl.float64)
    else:
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + t64 * stride_ct + d[None, :], mask=mask, other=0.0)
        s = tl.load(SIN + t64 * stride_st + d[None, :], mask=mask, other=0.0)
    if INVERSE:
        s = -s  # R(-theta) = R(theta)^T: the backward
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    y_off = bh.to(tl.int64) * T * (2 * HALF) + t64 * (2 * HALF) + d[None, :]  # y (B, H, T, D) contiguous
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _config(T: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): planes per block up to MAX_BLOCK_D, positions to fill TILE."""
    block_d = min(triton.next_power_of_2(half), MAX_BLOCK_D)
    block_t = min(triton.next_power_of_2(T), max(1, TILE // block_d))
    return block_t, block_d, max(1, min(4, block_t * block_d // 256))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is unit-stride (or of size 1), else a contiguous copy."""
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """y = R(theta) x (or R(-theta) x): x (B, H, T, D) any outer strides -> y contiguous (B, H, T, D)."""
    B, H, T, D = x.shape
    half = D // 2
    x = _unit_last(x)
    cos, sin = _unit_last(cos), _unit_last(sin)
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    block_t, block_d, num_warps = _config(T, half)
    n_tblk, n_dblk = triton.cdiv(T, block_t), triton.cdiv(half, block_d)
    _rope_kernel[(B * H * n_tblk * n_dblk,)](
        x, cos, sin, y,
        B * H, H, T, n_dblk, n_tblk,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), sin.stride(0),
        HALF=half, INVERSE=inverse, IS_FP64=x.dtype == torch.float64, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # cos and sin are a fixed table of angles: no gradient for them
        return _rotate(dy, cos, sin, inverse=True), None, None


@register("triton", "rope")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, D) by cos, sin (T, D/2) float32 (see the header); inputs already
    validated by the API.  Returns a contiguous (B, H, T, D) tensor in x's dtype; no gradient for cos/sin."""
    return _RopeFn.apply(x, cos, sin)
