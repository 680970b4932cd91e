"""Causal FlashAttention-2 in Triton: forward and backward, registered as the "triton" causal_attention.

Algorithm (Dao, "FlashAttention-2", 2023).  Shapes: q (B, H, Tq, D), k/v (B, H_kv, Tk, D), Tq <= Tk; the
causal mask is aligned bottom-right, so query i sees keys j <= i + OFFSET with OFFSET = Tk - Tq (the
same kernel serves training, Tq == Tk, and KV-cache decoding, Tq < Tk).

Grouped-query attention (GQA; H_kv = 1 is multi-query): H = GROUP * H_kv, and query head h reads k/v
head h // GROUP (Hugging Face's ``repeat_kv`` layout), by pointer arithmetic: k and v are never
repeated in memory.  The forward and dQ programs of head h simply read kv head h // GROUP (GROUP is
not specialized there: MHA and every group share one compiled kernel).  Each dK/dV program owns one
key tile of one *kv* head and walks the query tiles of the GROUP query heads that read it, head by
head, accumulating in the same registers: dK_j = sum over the group's heads of sum_i dS_ij q_i, so the
sum needs neither atomics nor a (B, H, Tk, D) buffer to reduce afterwards (the constexpr GQA selects
that loop; without it the kernel is the multi-head one as it was).

* Forward, one program per (batch*head, BLOCK_M queries): keep the query tile in registers and stream
  the key/value tiles through it with the online softmax: running row max m, running sum l, unnormalized
  accumulator acc (all fp32).  Per key tile: s = q k^T * scale*log2(e) (log2e folded into the scale so
  the kernel uses exp2), m' = max(m, rowmax s), p = exp2(s - m'), l = l*exp2(m - m') + rowsum p,
  acc = acc*exp2(m - m') + p v.  At the end o = acc / l and the log-sum-exp lse = (m + log2 l) / log2(e)
  (natural log, (B, H, Tq) fp32) is saved for the backward.  Key tiles entirely above the diagonal are
  never visited (causal early exit); tiles entirely below it run without the mask; only tiles crossing
  the diagonal (or the ragged tail Tk) apply it.
* Backward recomputes P = exp(q k^T * scale - lse) tile by tile; no (Tq, Tk) matrix exists, ever:
  1. preprocess: delta = rowsum(dO * O)  (B, H, Tq) fp32 (equals rowsum(P * dP));
  2. dK/dV, one program per (kv head, key tile), iterating over the group's query heads and, for
     each, over the query tiles that can see the tile:
     dV += P^T dO, dP = dO V^T, dS = P * (dP - delta), dK += dS^T Q * scale;
  3. dQ, one program per query tile, iterating over its visible key tiles: dQ += dS K * scale.
  Each output is written by exactly one program: no atomics, deterministic, autotune-safe.

Cost (Tq = Tk = T, causal): forward ~2*B*H*T^2*D FLOPs (two matmuls of 2*T^2*D each, halved by the
mask); backward ~2.5x that (five matmuls, QK^T recomputed, halved by the mask).  Memory traffic: the
forward reads q once and k, v once per query tile (~T/BLOCK_M times) and writes o plus 4 bytes/row of
lse -- O(T*D) memory instead of the O(T^2) score matrix; the backward reads q, k, v, o, dO, lse, delta
and writes dq, dk, dv, again O(T*D) memory.

Precision: fp16/bf16 inputs multiply on tensor cores with fp32 accumulation; fp32 inputs use IEEE fp32
dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, like PyTorch's matmuls).
Head dims 16..256 (padded to a power of two >= 16 with masks, e.g. 80 -> 128); any Tq, Tk >= 1.
q/k/v may be strided views (e.g. slices of a fused (B, T, 3, H, D) QKV projection) as long as the
last dim is contiguous (otherwise they are copied).  The (batch, head) base offsets are 64-bit, so
B*H*T*D may exceed 2^31; offsets inside one (batch, head) slice (T * stride_t) must stay below 2^31.
Grid: batch*head on axis 0 (CUDA allows 2^31 - 1 blocks there, so large-batch decoding launches; axes 1
and 2 stop at 65,535) and the tiles of T on axis 1 (so T <= 65,535 * BLOCK, over a million tokens).
Query tiles are started last-first: under the causal mask the last tiles do the most work.
Limits: float64 and D > 256 fall back to the reference implementation; no dropout.  With GQA the
dK/dV grid has B*H_kv*Tk/BLOCK_N programs, GROUP times fewer (each doing GROUP times the work): at
small B*H_kv*Tk (MQA, one sequence of a few thousand tokens) that launch may not fill the GPU.
On a GPU the tiles are autotuned over the per-head-dim lists of kernels/_attention_tiles.py (each
proven in CI to compile for sm_80/sm_90 without spills: tests/test_triton_compile.py), keyed on the
power-of-two bucket of the tiled length clamped to [16, 16384], the head dim and the dtype (dK/dV also
on GROUP, since its programs do GROUP times the work); under TRITON_INTERPRET (CPU) one small fixed
configuration is used so the tests stay fast.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _attention_tiles, reference
from .backends import register, triton_interpreting

# Triton decides interpreter-or-compiler when a kernel is decorated (at import of this module).
INTERPRET = triton_interpreting()
LOG2E = 1.4426950408889634


def _tuned(kernel: str, key: list[str]):
    """Autotune on the GPU over the tiles of kernels/_attention_tiles.py, pruned per launch to the list
    for its dot kind and head dim; in the interpreter the launch passes one fixed config instead."""
    def wrap(fn):
        if INTERPRET:
            return fn
        prune = _attention_tiles.pruner(kernel, key[0], fn)
        return triton.autotune(configs=_attention_tiles.configs(kernel), key=key,
                               prune_configs_by={"early_config_prune": prune})(fn)
    return wrap


_INTERP_FWD = {"BLOCK_M": 32, "BLOCK_N": 16}  # unequal tiles exercise the diagonal-split logic
_INTERP_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32}
# Tuning keys (the autotuner appends the tensors' dtypes itself): the forward and dQ kernels tile the
# queries, dK/dV the keys, so each is keyed on the bucket of its own length.  Buckets are powers of two
# clamped to [16, 16384] (_tune_bucket): decoding (Tq = 1 while Tk grows by one per token) stays in one
# bucket and is tuned once, and no run tunes more than 11 times per kernel, head dim and dtype.
_TUNE_MIN, _TUNE_MAX = 16, 16384


@triton.jit
def _heavy_first(BLOCK: tl.constexpr):
    """First row of this program's query tile, counted from the end: grid axis 1 enumerates the tiles,
    and the last tiles (which see the most keys under the causal mask) are started first, so the
    light ones fill in the tail of the launch."""
    return (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d,
              qk_scale, TK, D: tl.constexpr, OFFSET, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < TK) & (offs_d[None, :] < D)
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:  # diagonal / ragged tiles only
        keep = (offs_n[None, :] <= offs_m[:, None] + OFFSET) & (offs_n[None, :] < TK)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


# GROUP (query heads per kv head) is not specialized in the forward and dQ kernels: it only picks the kv
# head's base pointer, so MHA (GROUP = 1) and every GQA group run the same compiled kernel.
@_tuned("fwd", ["TUNE_TQ", "D"])
@triton.jit(do_not_specialize=["GROUP"])
def _fwd_kernel(Q, K, V, O, LSE, qk_scale,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                H, GROUP, TQ, TK, D: tl.constexpr, TUNE_TQ,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    off_bh = tl.program_id(0)
    start_m = _heavy_first(BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hk = (off_bh % H // GROUP).to(tl.int64)  # the kv head this query head reads
    q_base = Q + off_b * sqb + off_h * sqh
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    OFFSET = TK - TQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < TQ) & (offs_d[None, :] < D)
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys 0..start_m+OFFSET are visible to every row of the tile: whole tiles below that need no mask
    full_hi = ((start_m + OFFSET + 1) // BLOCK_N) * BLOCK_N
    # keys beyond the tile's last row (start_m + BLOCK_M - 1 + OFFSET) are never visited
    hi = tl.minimum(start_m + BLOCK_M + OFFSET, TK)
    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, skt, svt, start_n, offs_m, offs_d,
                                  qk_scale, TK, D, OFFSET, BLOCK_N, False, PREC)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, skt, svt, start_n, offs_m, offs_d,
                                  qk_scale, TK, D, OFFSET, BLOCK_N, True, PREC)
    acc = acc / l_i[:, None]
    o_base = O + off_b * sob + off_h * soh
    tl.store(o_base + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural-log log-sum-exp of the scaled scores
    tl.store(LSE + off_bh.to(tl.int64) * TQ + offs_m, lse, mask=offs_m < TQ)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, TQ, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    off_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < TQ) & (offs_d[None, :] < D)
    o = tl.load(O + off_b * sob + off_h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * TQ + offs_m, delta, mask=offs_m < TQ)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt, start_m, offs_n, offs_d,
               qk_scale, TQ, D: tl.constexpr, OFFSET, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < TQ
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :], mask=q_mask, other=0.0)
    # padding rows get lse = +inf, so their probabilities are exactly 0
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
    pT = tl.exp2(sT - lse2[None, :])
    if MASKED:
        pT = tl.where(offs_n[:, None] <= offs_m[None, :] + OFFSET, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


# Grid (B*H_kv, key tiles).  GQA (a constexpr: GROUP > 1) picks the loops: without it (MHA) they are
# exactly the single-head kernel's, whose tiles the AOT check proved; with it every group compiles to one
# kernel (GROUP's divisibility by 16 is not specialized: one more variant would buy nothing).
@_tuned("dkdv", ["TUNE_TK", "D", "GROUP"])
@triton.jit(do_not_specialize_on_alignment=["GROUP"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                     sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                     H, GROUP, TQ, TK, D: tl.constexpr, TUNE_TK,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     GQA: tl.constexpr):
    off_bhk = tl.program_id(0)  # (batch, kv head)
    start_n = tl.program_id(1) * BLOCK_N  # the first key tiles see the most queries: they start first
    H_KV = H // GROUP
    off_b = (off_bhk // H_KV).to(tl.int64)
    off_hk = (off_bhk % H_KV).to(tl.int64)
    OFFSET = TK - TQ
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < TK) & (offs_d[None, :] < D)
    k = tl.load(K + off_b * skb + off_hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * svb + off_hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query i sees key j iff i >= j - OFFSET: query tiles before the first such row are skipped
    lo = (tl.maximum(start_n - OFFSET, 0) // BLOCK_M) * BLOCK_M
    # from the first tile whose top row sees the tile's last key on, no mask is needed
    full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - OFFSET, 0), BLOCK_M) * BLOCK_M
    mid = tl.minimum(full_lo, TQ)
    q_bh = Q + off_b * sqb + off_hk * GROUP * sqh  # the group's first query head (the only one in MHA)
    do_bh = DO + off_b * sdb + off_hk * GROUP * sdh
    row_bh = (off_b * H + off_hk * GROUP) * TQ  # its rows of lse and delta
    if GQA:
        # The GROUP query heads that read this kv head add their shares to the same dk, dv registers.
        # One flat loop per part walks the (head, query tile) pairs head by head: written as a loop over
        # heads around the two loops below, the compiler kept more values live and 42 of the 178 GQA
        # configs the AOT check compiles spilled.
        n_masked = tl.cdiv(mid - lo, BLOCK_M)
        for it in range(0, GROUP * n_masked):
            g = it // n_masked  # the g-th query head of the group, query tile lo + (it % n_masked) * BLOCK_M
            # the q/dO head offset in 64 bits, as every (batch, head) base (g * TQ, a row of lse, fits 32:
            # with g * TQ in 64 bits too, one fp32 config spilled)
            gl = g.to(tl.int64)
            dk, dv = _dkdv_tile(dk, dv, k, v, q_bh + gl * sqh, do_bh + gl * sdh, LSE + row_bh + g * TQ,
                                DELTA + row_bh + g * TQ, sqt, sdt, lo + (it - g * n_masked) * BLOCK_M, offs_n,
                                offs_d, qk_scale, TQ, D, OFFSET, BLOCK_M, True, PREC)
        n_full = tl.cdiv(TQ - mid, BLOCK_M)
        for it in range(0, GROUP * n_full):
            g = it // n_full
            gl = g.to(tl.int64)
            dk, dv = _dkdv_tile(dk, dv, k, v, q_bh + gl * sqh, do_bh + gl * sdh, LSE + row_bh + g * TQ,
                                DELTA + row_bh + g * TQ, sqt, sdt, mid + (it - g * n_full) * BLOCK_M, offs_n,
                                offs_d, qk_scale, TQ, D, OFFSET, BLOCK_M, False, PREC)
    else:
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_bh, do_bh, LSE + row_bh, DELTA + row_bh, sqt, sdt, start_m,
                                offs_n, offs_d, qk_scale, TQ, D, OFFSET, BLOCK_M, True, PREC)
        for start_m in range(mid, TQ, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_bh, do_bh, LSE + row_bh, DELTA + row_bh, sqt, sdt, start_m,
                                offs_n, offs_d, qk_scale, TQ, D, OFFSET, BLOCK_M, False, PREC)
    dk = dk * sm_scale
    tl.store(DK + off_b * sdkb + off_hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * sdvb + off_hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, skt, svt, start_n, offs_m, offs_d,
             qk_scale, TK, D: tl.constexpr, OFFSET, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < TK) & (offs_d[None, :] < D)
    k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        keep = (offs_n[None, :] <= offs_m[:, None] + OFFSET) & (offs_n[None, :] < TK)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@_tuned("dq", ["TUNE_TQ", "D"])
@triton.jit(do_not_specialize=["GROUP"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sdqb, sdqh, sdqt,
                   H, GROUP, TQ, TK, D: tl.constexpr, TUNE_TQ,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    off_bh = tl.program_id(0)
    start_m = _heavy_first(BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    OFFSET = TK - TQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < TQ
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + off_bh.to(tl.int64) * TQ + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + off_bh.to(tl.int64) * TQ + offs_m, mask=row_ok, other=0.0)
    off_hk = (off_bh % H // GROUP).to(tl.int64)  # the kv head this query head reads
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi = ((start_m + OFFSET + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + OFFSET, TK)
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, skt, svt, start_n, offs_m, offs_d,
                      qk_scale, TK, D, OFFSET, BLOCK_N, False, PREC)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, skt, svt, start_n, offs_m, offs_d,
                      qk_scale, TK, D, OFFSET, BLOCK_N, True, PREC)
    dq = dq * sm_scale
    tl.store(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------- host


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_precision(q: torch.Tensor) -> str:
    """fp32 dots in IEEE fp32, or TF32 where PyTorch's own fp32 matmuls use it (allow_tf32)."""
    if q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _meta(q: torch.Tensor, k: torch.Tensor) -> dict:
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    prec = _dot_precision(q)
    block_d = max(16, triton.next_power_of_2(D))
    return {"B": B, "H": H, "H_kv": H_kv, "GROUP": H // H_kv, "Tq": Tq, "Tk": Tk, "D": D, "BLOCK_D": block_d,
            "PREC": prec, "TUNE_TQ": _tune_bucket(Tq), "TUNE_TK": _tune_bucket(Tk)}


def _tune_bucket(T: int) -> int:
    """The autotuning bucket of a sequence length: a power of two in [_TUNE_MIN, _TUNE_MAX]."""
    return min(max(triton.next_power_of_2(T), _TUNE_MIN), _TUNE_MAX)


def _grid(T: int, BH: int, block: str, fixed: dict):
    """(batch*head, tiles of T): B*H on axis 0, whose cap is 2^31 - 1 blocks (axes 1 and 2 stop at 65,535),
    so large-batch decoding launches; T / BLOCK tiles on axis 1 (T up to 65,535 * 16 = 1M tokens)."""
    if INTERPRET:
        return (BH, triton.cdiv(T, fixed[block]))
    return lambda meta: (BH, triton.cdiv(T, meta[block]))


def _forward(q, k, v, sm_scale: float):
    m = _meta(q, k)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((m["B"], m["H"], m["Tq"]), dtype=torch.float32, device=q.device)
    fixed = _INTERP_FWD if INTERPRET else {}
    _fwd_kernel[_grid(m["Tq"], m["B"] * m["H"], "BLOCK_M", fixed)](
        q, k, v, o, lse, sm_scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        m["H"], m["GROUP"], m["Tq"], m["Tk"], m["D"], m["TUNE_TQ"], BLOCK_D=m["BLOCK_D"], PREC=m["PREC"], **fixed)
    return o, lse


def _backward(q, k, v, o, lse, do, sm_scale: float):
    m = _meta(q, k)
    BH = m["B"] * m["H"]
    do = _last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    _bwd_preprocess[(BH, triton.cdiv(m["Tq"], 64))](
        o, do, delta, *_strides(o), *_strides(do), m["H"], m["Tq"], m["D"], BLOCK_M=64, BLOCK_D=m["BLOCK_D"])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # (B, H_kv, Tk, D): one sum per kv head
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    common = (m["H"], m["GROUP"], m["Tq"], m["Tk"], m["D"])
    fixed = _INTERP_DKDV if INTERPRET else {}
    _bwd_dkdv_kernel[_grid(m["Tk"], m["B"] * m["H_kv"], "BLOCK_N", fixed)](
        q, k, v, do, lse, delta, dk, dv, sm_scale, sm_scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        *common, m["TUNE_TK"], BLOCK_D=m["BLOCK_D"], PREC=m["PREC"], GQA=m["GROUP"] > 1, **fixed)
    fixed = _INTERP_FWD if INTERPRET else {}
    _bwd_dq_kernel[_grid(m["Tq"], BH, "BLOCK_M", fixed)](
        q, k, v, do, lse, delta, dq, sm_scale, sm_scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        *common, m["TUNE_TQ"], BLOCK_D=m["BLOCK_D"], PREC=m["PREC"], **fixed)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Causal attention whose backward recomputes the probabilities from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, sm_scale: float):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.sm_scale)
        return dq, dk, dv, None


def flash_attention_forward(q, k, v, scale: float | None = None):
    """Forward only, for inspection and tests: returns (o, lse) with lse (B, H, Tq) fp32, natural log."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _forward(*(_last_dim_contiguous(t) for t in (q, k, v)), sm_scale)


@register("triton", "causal_attention")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 causal attention (inputs validated by ``kernels.causal_attention``)."""
    if q.dtype == torch.float64 or q.shape[-1] > 256:
        return reference.causal_attention(q, k, v, scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, sm_scale)
