# Fused RMSNorm (and residual-add + RMSNorm) in Triton: the "triton" backend's rms_norm and
# add_rms_norm (Llama, Qwen).
#
# Algorithm
#   x is viewed as M rows of width C (the last dim).  Forward: one program per row loads the whole
#   row into registers (BLOCK_C = next_power_of_2(C), masked), computes rstd = (mean(x^2) + eps)^-1/2
#   in fp32, writes y = x * rstd * w with one cast to x's dtype, and saves rstd (fp32, M of them) for
#   backward.  The add variant loads x and residual, forms s = x + r in fp32, rounds it to x's dtype,
#   stores it, and normalizes that rounded s (the tensor the caller gets and backward sees).
#   mean(x^2) without overflow or underflow: x^2 of an fp32 entry near 1e20 is inf, of one near 1e-20
#   a denormal (zero on a GPU).  So the row is scaled by 2^-k, with 2^k the power of two at or below
#   max(max|x|, sqrt(eps)): multiplying by a power of two is exact, the scaled entries are below 2 in
#   magnitude, and rstd = 2^-k * (mean((x 2^-k)^2) + eps 4^-k)^-1/2 where eps 4^-k <= 4 (the floor
#   sqrt(eps) keeps it from overflowing for tiny rows; entries far below sqrt(eps) count for nothing
#   next to eps).  2^-k is built from max(...)'s exponent bits; an all-zero row needs no special case.
#   Backward: P programs (a few per SM), each owning a contiguous group of rows.  Per row it
#   recomputes x_hat = x * rstd, writes dx, and accumulates dW += dy * x_hat in fp32 registers; at the
#   end each program writes its partial row into a (P, C) fp32 buffer and torch.sum over P finishes
#   the reduction (no atomics, deterministic; the partials are P*C*4 bytes, tiny next to M*C).
#   Rows wider than SPLIT_C = 8192 (x, dy, w and dW no longer fit in registers) take two kernels:
#   one program per row computes dx in 4096-wide chunks in two passes (the row's sum first, then dx),
#   and a 2-D grid of (row group, 1024-column block) programs sums the dW partials.
#
# VJP (per row; r = (mean(x^2) + eps)^-1/2, x_hat = x * r, y = x_hat * w, g = dy * w)
#   d r / d x_i = -r^3 x_i / C,  so  d y_j / d x_i = w_j (r delta_ij - r^3 x_j x_i / C), and
#   dx_i = sum_j dy_j d y_j / d x_i = r g_i - r^3 x_i sum_j g_j x_j / C = r * (g_i - x_hat_i * mean(g * x_hat)),
#   i.e. dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat));   dW = sum_rows dy * x_hat.
#   Add variant: s = x + r feeds both the norm and the second output, so ds = (dx above) + (incoming
#   grad of s), added in the same kernel (HAS_DS), and dx = dresidual = ds (one tensor returned for
#   both inputs; autograd copies it before it could alias two leaves' .grad).
#
# Bytes moved (b = bytes per element of x, M rows of width C; weight and the 4M bytes of rstd are noise):
#   rms_norm      fwd: read x, write y                     = 2*M*C*b
#                 bwd: read x, dy, write dx                = 3*M*C*b (+ 2*P*C*4 partials)
#                      C > SPLIT_C: x, dy read twice more  = 5*M*C*b (the dx kernel's second pass
#                      mostly hits L2; the dW kernel reads x and dy again)
#   add_rms_norm  fwd: read x, r, write s, y               = 4*M*C*b (unfused add + norm: 5*M*C*b)
#                 bwd: read s, dy, ds, write dx (shared)   = 4*M*C*b (unfused: 6*M*C*b)
#
# Limits
#   * C <= 16384 (MAX_C): the forward holds a row in registers.  Wider rows, and float64 (the
#     exponent-bit scaling is float32's), are routed to kernels.reference (correct, autograd through
#     PyTorch, just not fused).  Every launch at C in {768, 4096, 12288, 16384} compiles for
#     sm_80/sm_90 without a spilled register: tests/test_triton_compile.py (kernels/aot.py).
#   * Inputs: any row stride (x.reshape(-1, C) is a view where possible and its row stride is passed
#     to the kernel); a last dim that is not unit-stride is made contiguous, as is a strided weight.
#     Outputs are fresh contiguous tensors.  Row offsets are computed in int64.
#   * fp16/bf16/fp32 are computed in fp32.  weight may have another dtype than x (e.g. fp32 params,
#     bf16 activations); it is read as it is and its grad comes back in its own dtype.
#   * On the CPU this runs under TRITON_INTERPRET=1 (slow; bf16 is not emulated correctly there).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .backends import register
from .fused_layernorm import _n_programs, _rows  # the same row views and backward program count

MAX_C = 16384
# Above SPLIT_C the fused backward (a row per loop step, the dW accumulator in registers) would spill:
# wider rows take two kernels, dx one row per program in WIDE_BLOCK_C chunks, dW by DW_BLOCK_C columns.
SPLIT_C = 8192
WIDE_BLOCK_C = 4096
DW_BLOCK_C = 1024


@triton.jit
def _inv_pow2_scale(amax, eps):
    """2^-k (float32, exact) for 2^k the power of two at or below max(amax, sqrt(eps)): a row scaled by
    it has entries below 2 in magnitude, and eps * 4^-k <= 4.  Built from the float's exponent bits e
    (the value lies in [2^(e-127), 2^(e-126))), clamped to [1, 253] so 2^(127-e) is a normal float."""
    ref = tl.maximum(amax, tl.sqrt(eps))  # a NaN amax may be dropped here: the NaN still reaches the sum
    e = (ref.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(e, 1), 253)
    return ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _rms_fwd_kernel(
    X, R, S, Y, W, Rstd,  # R, S only read/written when HAS_RES
    stride_x, stride_r, C, eps,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 so row * stride cannot overflow on big tensors
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # the sum in x's dtype: what the caller gets
        tl.store(S + row * C + cols, s, mask=mask)
        x = s.to(tl.float32)  # normalize the rounded sum, exactly the tensor backward will see
    inv = _inv_pow2_scale(tl.max(tl.abs(x), axis=0), eps)
    xs = x * inv  # exact; masked lanes are 0 and add nothing
    ms = tl.sum(xs * xs, axis=0) / C + eps * inv * inv  # (mean(x^2) + eps) * 4^-k
    rstd = inv * tl.rsqrt(ms)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_kernel(
    X, DY, DS, DX, W, Rstd, DWp,  # DS (incoming grad of the sum) only read when HAS_DS
    stride_x, stride_dy, stride_ds, M, C, rows_per_prog,
    HAS_DS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    inv_c = 1.0 / C
    row_start = pid * rows_per_prog  # < M, fits int32
    n_rows = tl.minimum(rows_per_prog, M - row_start)
    for i in range(n_rows):
        r64 = row_start.to(tl.int64) + i
        x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + r64)
        x_hat = x * rstd  # zero on masked lanes (x loaded as 0 there)
        dw += dy * x_hat  # before the row's reduction: after it, triton 3.6's ptxas spills 8 B at C = 768 fp16 on sm_90
        g = dy * w
        c = tl.sum(g * x_hat, axis=0) * inv_c  # mean(dy*w*x_hat)
        dx = (g - x_hat * c) * rstd
        if HAS_DS:
            dx += tl.load(DS + r64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DWp + pid.to(tl.int64) * C + cols, dw, mask=mask)


@triton.jit
def _rms_bwd_wide_kernel(
    X, DY, DS, DX, W, Rstd, stride_x, stride_dy, stride_ds, C,
    HAS_DS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx of one row wider than SPLIT_C, BLOCK_C columns at a time in two passes: sum(dy*w*x_hat)
    first, then dx (x, dy and w read twice, the second time mostly from L2); registers hold one chunk."""
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(Rstd + row)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc += dy * w * x
    c = tl.sum(acc, axis=0) * rstd / C  # mean(dy*w*x_hat)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < C
        x_hat = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) * rstd
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(
            W + cols, mask=mask, other=0.0).to(tl.float32)
        dx = (g - x_hat * c) * rstd
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_dw_kernel(
    X, DY, Rstd, DWp, stride_x, stride_dy, M, C, rows_per_prog,
    BLOCK_C: tl.constexpr,
):
    """dW partials of wide rows: program (p, j) sums dy * x_hat over row group p, column block j."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid * rows_per_prog
    n_rows = tl.minimum(rows_per_prog, M - row_start)
    for i in range(n_rows):
        r64 = row_start.to(tl.int64) + i
        x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        dw += dy * (x * tl.load(Rstd + r64))
    tl.store(DWp + pid.to(tl.int64) * C + cols, dw, mask=mask)


def _config(C: int) -> tuple[int, int]:
    """BLOCK_C covers the row; one warp per 256 elements (8 per thread), 1 to 16 warps, as LayerNorm's
    -- but 32 warps (16 elements per thread) for the 16384-wide block: with 16, ptxas (CUDA 13) gives
    the fp32 add variant's forward 64 registers and spills the two rows it holds (x and residual)."""
    block_c = triton.next_power_of_2(C)
    return block_c, 32 if block_c >= 16384 else min(max(block_c // 256, 1), 16)


def _forward(x, residual, weight, eps):
    """y (M, C), the stored sum s (add variant, else None), the rows normalized (M, C) and rstd (M,)."""
    C = x.shape[-1]
    x2 = _rows(x, C)  # (M, C)
    M = x2.shape[0]
    weight = weight.contiguous()  # (C,) views may be strided
    y = torch.empty((M, C), dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _rows(residual, C)
        s = torch.empty((M, C), dtype=x.dtype, device=x.device)
    else:
        r2, s = x2, y  # placeholders, never touched (HAS_RES=False)
    if M > 0:
        block_c, num_warps = _config(C)
        _rms_fwd_kernel[(M,)](
            x2, r2, s, y, weight, rstd, x2.stride(0), r2.stride(0), C, eps,
            HAS_RES=residual is not None, BLOCK_C=block_c, num_warps=num_warps,
        )
    xn = s if residual is not None else x2  # what was normalized
    return y, (s if residual is not None else None), xn, rstd


def _backward(xn, dy, ds, weight, rstd):
    """dx (M, C) in x's dtype (plus ds when given) and dweight (C,) in weight's dtype."""
    M, C = xn.shape
    dy2 = _rows(dy, C)
    ds2 = _rows(ds, C) if ds is not None else dy2
    dx = torch.empty((M, C), dtype=xn.dtype, device=xn.device)
    weight = weight.contiguous()
    P = _n_programs(M, xn.device)
    rows_per_prog = triton.cdiv(M, P) if M > 0 else 1
    P = triton.cdiv(M, rows_per_prog) if M > 0 else 1
    dw_part = torch.zeros((P, C), dtype=torch.float32, device=xn.device)  # (P, C) per-program partials
    if M > 0 and C <= SPLIT_C:
        block_c, num_warps = _config(C)
        _rms_bwd_kernel[(P,)](
            xn, dy2, ds2, dx, weight, rstd, dw_part,
            xn.stride(0), dy2.stride(0), ds2.stride(0), M, C, rows_per_prog,
            HAS_DS=ds is not None, BLOCK_C=block_c, num_warps=num_warps,
        )
    elif M > 0:  # wide rows: dx row by row in chunks, then dW by column blocks
        _rms_bwd_wide_kernel[(M,)](
            xn, dy2, ds2, dx, weight, rstd, xn.stride(0), dy2.stride(0), ds2.stride(0), C,
            HAS_DS=ds is not None, BLOCK_C=WIDE_BLOCK_C, num_warps=8,
        )
        _rms_bwd_dw_kernel[(P, triton.cdiv(C, DW_BLOCK_C))](
            xn, dy2, rstd, dw_part, xn.stride(0), dy2.stride(0), M, C, rows_per_prog,
            BLOCK_C=DW_BLOCK_C, num_warps=4,
        )
    return dx, dw_part.sum(0).to(weight.dtype)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, xn, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(xn, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xn, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(xn, dy, None, weight, rstd)
        return dx.view(ctx.x_shape), dw if ctx.needs_input_grad[1] else None, None


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, _, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        # Grads of unused outputs arrive as zeros (materialize_grads is on), so both are tensors.
        s, weight, rstd = ctx.saved_tensors
        dsum, dw = _backward(s, dy, ds, weight, rstd)
        dsum = dsum.view(ctx.x_shape)
        need = ctx.needs_input_grad
        return dsum if need[0] else None, dsum if need[1] else None, dw if need[2] else None, None


def _unfused(x: torch.Tensor) -> bool:
    """Inputs the kernels do not take (rows wider than registers hold, float64): to the reference."""
    return x.shape[-1] > MAX_C or x.dtype == torch.float64


@register("triton", "rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused RMSNorm over the last dim (see the header); inputs already validated by the API."""
    if _unfused(x):
        return reference.rms_norm(x, weight, eps)
    return _RMSNormFn.apply(x, weight, float(eps))


@register("triton", "add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(rms_norm(x + residual), x + residual)``, both in x's dtype (see the header)."""
    if _unfused(x):
        return reference.add_rms_norm(x, residual, weight, eps)
    return _AddRMSNormFn.apply(x, residual, weight, float(eps))
