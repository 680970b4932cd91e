"""Triton kernels for the loss: fused softmax-cross-entropy and the chunked LM head + loss.

Math.  For one row of logits z (V,) with target y and m = max(z), d = sum(exp(z - m)):
    loss = log d - (z_y - m),   d loss / d z = softmax(z) - onehot(y) = exp((z - m) - log d) - onehot(y).
(log d and z_y - m stay apart, as in PyTorch's log_softmax: lse = m + log d rounded to fp32 would
carry an error of ulp(max |z|) into the loss and every probability.)
The public loss is the mean over the n_valid rows whose target is not ``ignore_index`` (0 when
there are none), so each valid row's gradient is scaled by 1/n_valid and ignored rows get zero.
n_valid is counted on the device and read by the kernel through a pointer: no host sync.

Cross-entropy (``cross_entropy``).  One program per row, two sweeps over the vocab in BLOCK_V
pieces (V = 50257 takes 13 blocks of 4096): sweep 1 keeps an online max m and sum d of exp(z - m)
(rescaling d whenever m grows); sweep 2 writes (exp((z - m) - log d) - onehot) * scale.  Everything is fp32 in registers whatever the storage dtype; row offsets are int64.  As in
Liger / llm.c the gradient is produced in the forward pass (for grad_out = 1) and backward only
multiplies it by grad_out.  Bytes moved: the kernel reads the logits twice and writes the gradient
once (3 N V elements), backward's grad_out scaling reads and writes it once more (5 N V in all),
against ~8 N V for an unfused log_softmax + gather + their backwards.  ``_ce_forward(..., inplace=True)`` writes the gradient
over the logits themselves (used on the LM-head chunks this module owns); the public autograd path
writes into a fresh buffer, so a logits tensor the caller still holds is never touched.

Linear cross-entropy (``linear_cross_entropy``).  The chunk loop of kernels/_chunked_linear_ce.py
(shared with the "cuda" backend), with the kernel above run in place on each logits chunk with scale 1
(so fp16 gradients do not underflow): the (N, V) logits never exist, the extra memory is one
chunk_rows x V logits chunk plus grad_h (N, C) and the fp32 grad_W (V, C).  Bytes moved per chunk:
the logits chunk is written once by the matmul, read twice and rewritten once by the kernel, and
read by the two gradient matmuls.

Limits.  float64 inputs fall back to ``kernels.reference`` (Triton has no fast fp64 path).  The
stored gradients (N, V for cross_entropy) live from forward to backward; calling backward twice
(retain_graph) is fine since backward does not modify them.  Targets outside [0, V) that are not
``ignore_index`` are an error: the API rejects them for CPU tensors, and on a GPU
``check_targets``' device-side assert fails the next synchronization (the kernel itself only
bounds-masks them so that it never reads out of bounds).  On the
CPU (or a torch without mm's out_dtype) the fp16/bf16 per-chunk dlogits^T @ h product is rounded to
the input dtype before the fp32 sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._chunked_linear_ce import _CHUNK_ELEMS  # noqa: F401  (re-exported: the chunk size)
from ._chunked_linear_ce import check_targets
from ._chunked_linear_ce import linear_cross_entropy_chunked as _chunked
from ._chunked_linear_ce import rows_per_chunk as _chunk_rows  # noqa: F401  (re-exported)
from ._chunked_linear_ce import valid_count_scale as _valid_count_scale
from .backends import register

# Vocab block per loop step (V = 50257 -> 13 blocks); also fine for the interpreter's speed.
MAX_BLOCK_V = 4096


@triton.jit
def _ce_kernel(
    z_ptr, z_stride,  # logits (N, V), unit stride along V
    y_ptr,  # targets (N,), int32 or int64
    g_ptr, g_stride,  # gradient out (N, V); may be z_ptr itself (in place)
    loss_ptr,  # (N,) fp32 per-row loss, 0 for ignored rows
    scale_ptr,  # () fp32 gradient scale (1/n_valid, or 1)
    V, ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid & (y >= 0) & (y < V), y, 0)
    offs = tl.arange(0, BLOCK_V)

    # sweep 1: online max / sum-of-exp over the row
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    log_d = tl.log(d)
    z_y = tl.load(z_row + y_safe).to(tl.float32)
    # log d - (z_y - m), the two terms kept apart (as PyTorch's log_softmax): m + log d would be rounded
    # to the precision of m first, an error of ulp(max |z|)
    tl.store(loss_ptr + row, tl.where(valid, log_d - (z_y - m), 0.0))

    # sweep 2: gradient (softmax - onehot) * scale, zero for ignored rows
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp((z - m) - log_d)
            g = (p - tl.where(cols == y, 1.0, 0.0)) * scale
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


# True when the kernels were decorated under TRITON_INTERPRET=1 (decided at import, not at launch).
INTERPRET = type(_ce_kernel).__name__ == "InterpretedFunction"


def _launch_config(V: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    warps = 16 if block >= 4096 else 8 if block >= 1024 else 4
    return block, warps


def _ce_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    scale: torch.Tensor | None,
    *,
    write_grad: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses (N,) fp32 and, if ``write_grad``, (softmax - onehot) * scale (N, V).

    logits: (N, V); targets: (N,); scale: a 0-d fp32 device tensor.  With ``inplace`` the gradient
    overwrites ``logits`` (only for tensors the caller owns), else it goes to a new tensor.
    """
    N, V = logits.shape
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("_ce_forward(inplace=True) needs logits with unit stride along the vocab")
        logits = logits.contiguous()
    targets = targets.contiguous()
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    if write_grad:
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    else:
        grad = logits  # unused by the kernel
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=logits.device)
    block, warps = _launch_config(V)
    _ce_kernel[(N,)](
        logits, logits.stride(0), targets, grad, grad.stride(0), losses, scale, V, ignore_index,
        BLOCK_V=block, WRITE_GRAD=write_grad, num_warps=warps,
    )
    return losses, (grad if write_grad else None)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        V = logits.shape[-1]
        z, y = logits.reshape(-1, V), targets.reshape(-1)
        _, scale = _valid_count_scale(y, ignore_index)
        losses, grad = _ce_forward(z, y, ignore_index, scale, write_grad=True, inplace=False)
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # out of place: the stored gradient stays valid for a second backward (retain_graph)
        dlogits = (grad * grad_out).reshape(ctx.logits_shape)  # 0-d fp32 grad_out keeps grad.dtype
        return dlogits, None, None


@register("triton", "cross_entropy")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...); fp32 scalar (see module doc)."""
    if logits.dtype == torch.float64:
        return reference.cross_entropy(logits, targets, ignore_index)
    check_targets(targets, logits.shape[-1], ignore_index)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropy.apply(logits, targets, ignore_index)
    y = targets.reshape(-1)
    _, scale = _valid_count_scale(y, ignore_index)
    losses, _ = _ce_forward(logits.reshape(-1, logits.shape[-1]), y, ignore_index, scale, write_grad=False)
    return losses.sum() * scale


# ---------------------------------------------------------------------------------------------
# Linear cross-entropy: LM head + loss in chunks of rows.


def _chunk_ce(logits, targets, ignore_index, need_grad):
    """The chunk kernel of the shared loop: the CE kernel in place on the chunk's own logits, scale 1."""
    losses, dlogits = _ce_forward(logits, targets, ignore_index, None, write_grad=need_grad, inplace=True)
    return losses.sum(), dlogits


def linear_cross_entropy_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``linear_cross_entropy`` with an explicit chunk size (rows of logits formed at a time)."""
    if hidden.dtype == torch.float64:
        return reference.linear_cross_entropy(hidden, weight, targets, ignore_index)
    return _chunked(_chunk_ce, hidden, weight, targets, ignore_index, chunk_rows)


@register("triton", "linear_cross_entropy")
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` without ever forming the (N, V) logits."""
    return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index)
