# SwiGLU's gate in Triton: the "triton" backend's swiglu, y = silu(g) * u = g * sigmoid(g) * u.
#
# Algorithm
#   Elementwise over gate and up viewed as M rows of width C (each may have its own row stride: the
#   model's gate and up can be the two halves of one fused projection, read in place).  When both are
#   contiguous they are one flat row of N elements instead (no masked lanes at row ends).  A program
#   owns a BLOCK_M x BLOCK_C tile; fp32 math (fp64 for fp64 inputs), one cast on store.
#   sigmoid from e = exp(-|g|) in (0, 1]: s = 1/(1 + e) for g >= 0, e/(1 + e) below, and 1 - s the other
#   one, so nothing overflows and 1 - s (the backward's) does not cancel for large g.
#
# VJP (s = sigmoid(g), silu(g) = g*s, silu'(g) = s + g*s*(1 - s) = s*(1 + g*(1 - s)))
#   dgate = dy * u * s * (1 + g*(1 - s)),   dup = dy * g * s.
#   The backward recomputes s from the saved g (no activation of its own saved between the passes).
#
# Bytes moved (b = bytes per element, N elements per input)
#   fwd: read g, u, write y = 3*N*b;  bwd: read g, u, dy, write dg, du = 5*N*b
#   (PyTorch's eager F.silu(g) * u: 4*N*b forward, the silu output materialized, and ~8*N*b backward).
#
# Limits
#   * Any shape (..., C); a last dim that is not unit-stride is made contiguous first.  Outputs are
#     fresh contiguous tensors of gate's shape; offsets are int64 (a flat row of > 2^31 elements too).
#   * Non-finite values follow IEEE arithmetic as in the reference: silu(-inf) = -inf * 0 = NaN,
#     silu(+inf) = inf, NaN stays NaN (and so do the gradients that see them).
#   * fp16/bf16/fp32 computed in fp32, fp64 in fp64.  On the CPU this runs under TRITON_INTERPRET=1.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backends import register

TILE = 2048  # elements per program
MAX_BLOCK_C = 2048


@triton.jit
def _up(v, IS_FP64: tl.constexpr):
    """Cast to the accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    if IS_FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _tile(pid, M, C, n_cblk, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows (BLOCK_M, 1) int64, columns (1, BLOCK_C) and the in-bounds mask of program pid's tile."""
    rows = (pid // n_cblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_cblk).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # int64: a flat row may pass 2^31
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _sigmoid_pair(g):
    """(sigmoid(g), 1 - sigmoid(g)) from e = exp(-|g|) in (0, 1]: no overflow, and 1 - s never cancels."""
    e = tl.exp(-tl.abs(g))
    inv = 1.0 / (1.0 + e)
    return tl.where(g >= 0, inv, e * inv), tl.where(g >= 0, e * inv, inv)


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, M, C, n_cblk, stride_g, stride_u,
    IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), M, C, n_cblk, BLOCK_M, BLOCK_C)
    g = _up(tl.load(G + rows * stride_g + cols, mask=mask, other=0.0), IS_FP64)
    u = _up(tl.load(U + rows * stride_u + cols, mask=mask, other=0.0), IS_FP64)
    s, _ = _sigmoid_pair(g)
    tl.store(Y + rows * C + cols, (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    G, U, DY, DG, DU, M, C, n_cblk, stride_g, stride_u, stride_dy,
    IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), M, C, n_cblk, BLOCK_M, BLOCK_C)
    g = _up(tl.load(G + rows * stride_g + cols, mask=mask, other=0.0), IS_FP64)
    u = _up(tl.load(U + rows * stride_u + cols, mask=mask, other=0.0), IS_FP64)
    dy = _up(tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0), IS_FP64)
    s, oms = _sigmoid_pair(g)
    dg = dy * u * s * (1.0 + g * oms)
    du = dy * g * s
    tl.store(DG + rows * C + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * C + cols, du.to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """(..., C) -> (M, C) view with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, C)
    if C > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _as_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors as (M, C) rows; as one flat row (1, N) when every one of them is contiguous."""
    if all(t.is_contiguous() for t in tensors):
        return [t.reshape(1, -1) for t in tensors]
    C = tensors[0].shape[-1]
    return [_rows(t, C) for t in tensors]


def _config(M: int, C: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, number of column blocks, programs): TILE elements per program."""
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_m = min(triton.next_power_of_2(M), max(1, TILE // block_c))
    n_cblk = triton.cdiv(C, block_c)
    return block_m, block_c, n_cblk, triton.cdiv(M, block_m) * n_cblk


def _num_warps(block_m: int, block_c: int) -> int:
    return max(1, min(4, block_m * block_c // 256))


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = _as_rows(gate, up)
    M, C = g2.shape
    y = torch.empty((M, C), dtype=gate.dtype, device=gate.device)
    block_m, block_c, n_cblk, n_prog = _config(M, C)
    _swiglu_fwd_kernel[(n_prog,)](
        g2, u2, y, M, C, n_cblk, g2.stride(0), u2.stride(0),
        IS_FP64=gate.dtype == torch.float64, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=_num_warps(block_m, block_c),
    )
    return y.view(gate.shape)


def _backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g2, u2, dy2 = _as_rows(gate, up, dy)
    M, C = g2.shape
    dg = torch.empty((M, C), dtype=gate.dtype, device=gate.device)
    du = torch.empty((M, C), dtype=up.dtype, device=up.device)
    block_m, block_c, n_cblk, n_prog = _config(M, C)
    _swiglu_bwd_kernel[(n_prog,)](
        g2, u2, dy2, dg, du, M, C, n_cblk, g2.stride(0), u2.stride(0), dy2.stride(0),
        IS_FP64=gate.dtype == torch.float64, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=_num_warps(block_m, block_c),
    )
    return dg.view(gate.shape), du.view(up.shape)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = _backward(gate, up, dy)
        need = ctx.needs_input_grad
        return dg if need[0] else None, du if need[1] else None


@register("triton", "swiglu")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` fused (see the header); inputs already validated by the API (same shape,
    dtype and device).  Returns a contiguous tensor of gate's shape and dtype."""
    return _SwiGLUFn.apply(gate, up)
