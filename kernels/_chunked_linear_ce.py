"""The LM head + loss in chunks of rows, for any backend that has a fused cross-entropy kernel.

``linear_cross_entropy(hidden, weight, targets) = cross_entropy(hidden @ weight.T, targets)``, without
ever forming the (N, V) logits.  For each chunk of rows: logits_c = h_c @ W^T (torch matmul), the
backend's cross-entropy kernel on logits_c giving the chunk's summed loss and dlogits_c = softmax -
onehot (scale 1, so fp16 gradients do not underflow; zero rows for ignored targets), then grad_h_c =
dlogits_c @ W and grad_W += dlogits_c^T @ h_c (fp32 accumulator, fp64 for fp64 inputs), all in the
forward pass; the global 1/n_valid and the incoming grad_out are applied to the (N, C) and (V, C)
results.  Extra memory: one (chunk_rows, V) logits chunk (two where the kernel writes dlogits to a new
tensor instead of over the logits), grad_h (N, C) and the accumulator (V, C); chunk_rows =
clamp(_CHUNK_ELEMS // V, 1, N), independent of N.

The kernel is passed in as ``chunk_ce(logits, targets, ignore_index, need_grad) -> (loss_sum, dlogits)``:
logits (rows, V) is the chunk's own buffer (the kernel may overwrite it), targets (rows,); loss_sum is
the 0-d sum of the valid rows' losses in the accumulation dtype, dlogits (rows, V) in the logits' dtype
or None when ``need_grad`` is False.  Used by the "triton" backend (kernels/fused_cross_entropy.py) and
the "cuda" backend (kernels/_cuda_backend.py).

Like every backend, it computes in its inputs' dtype whatever autocast says (the model casts hidden
and weight to the autocast dtype itself), and returns gradients in the inputs' dtypes.  On CUDA the
fp16/bf16 dlogits^T @ h product is accumulated in fp32, in place, by ``torch.addmm(out_dtype=, out=)``;
on the CPU (no such op there) it is rounded to the input dtype before the fp32 sum.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import reference

# Elements of one LM-head logits chunk (chunk_rows * V); 2**25 is 64 MB in bf16, ~667 rows at V=50257.
_CHUNK_ELEMS = 2**25

ChunkCE = Callable[[torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, "torch.Tensor | None"]]


def rows_per_chunk(N: int, V: int, chunk_rows: int | None) -> int:
    """Rows of logits formed at a time: ``chunk_rows`` if given, else ``_CHUNK_ELEMS // V``; within [1, N]."""
    rows = chunk_rows if chunk_rows is not None else _CHUNK_ELEMS // V
    return max(1, min(N, rows))


def check_targets(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """A target outside [0, V) that is not ``ignore_index`` is an error, without a host sync: on a GPU
    ``torch._assert_async`` fails the next synchronization with a device-side assert (as
    ``F.cross_entropy`` does), so a wrong target can never be scored silently as some other class.
    (The public API has already rejected such targets with a message for CPU tensors.)"""
    ok = ((targets >= 0) & (targets < V)) | (targets == ignore_index)
    torch._assert_async(ok.all(), f"cross_entropy: a target is outside [0, {V}) and is not ignore_index={ignore_index}")


def valid_count_scale(
    targets: torch.Tensor, ignore_index: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_valid, 1 / max(n_valid, 1)) as device tensors: counted on the device, no host sync."""
    n_valid = (targets != ignore_index).sum()
    return n_valid, 1.0 / n_valid.clamp(min=1).to(dtype)


def fused_linear_cross_entropy(
    chunk_ce: ChunkCE,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    *,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    chunk_rows: int | None = None,
    grad_weight_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss (0-d fp32, fp64 for fp64 inputs), d loss/d hidden (N, C) and d loss/d weight (V, C)
    for grad_out = 1; grad_h in hidden's dtype; grad_w accumulated in fp32 (fp64), returned in
    ``grad_weight_dtype`` (default: weight's dtype).

    hidden: (N, C); weight: (V, C); targets: (N,).  Rows are processed ``chunk_rows`` at a time
    (default: ``_CHUNK_ELEMS // V``), so at most one (chunk_rows, V) logits block exists at once.
    """
    N, C = hidden.shape
    V = weight.shape[0]
    rows = rows_per_chunk(N, V, chunk_rows)
    check_targets(targets, V, ignore_index)
    acc = reference._compute_dtype(hidden.dtype)
    need_grad = need_grad_hidden or need_grad_weight
    _, scale = valid_count_scale(targets, ignore_index, acc)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty(N, C, dtype=hidden.dtype, device=hidden.device) if need_grad_hidden else None
    grad_w = torch.zeros(V, C, dtype=acc, device=weight.device) if need_grad_weight else None
    with reference._exact(hidden.device):  # autocast off: the matmuls run in the inputs' dtype
        for start in range(0, N, rows):
            h = hidden[start : start + rows]
            # (rows, V) in the input dtype: the only V-wide tensor, handed to the kernel to own
            chunk_loss, dlogits = chunk_ce(h @ weight.t(), targets[start : start + rows], ignore_index, need_grad)
            loss_sum += chunk_loss
            if grad_h is not None:
                torch.mm(dlogits, weight, out=grad_h[start : start + rows])
            if grad_w is not None:
                _add_weight_grad(grad_w, dlogits, h)
            del dlogits  # free the chunk before the next matmul allocates one
    if need_grad_hidden:
        grad_h.mul_(scale)
    if need_grad_weight:  # scaled in fp32, then one rounding to the weight's dtype (frees the fp32 sum)
        grad_w = grad_w.mul_(scale).to(grad_weight_dtype or weight.dtype)
    return loss_sum * scale, grad_h, grad_w


# Device types on which torch.addmm(..., out_dtype=fp32, out=acc) runs (CUDA and meta in torch 2.11+;
# not the CPU), learned on first use: the fp16/bf16 product is then accumulated into the fp32 grad_w in
# place, with no temporary.
_ADDMM_OUT_DTYPE: dict[str, bool] = {}


def _add_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32 or fp64) += dlogits^T @ h, in place: no (V, C) temporary per chunk.

    fp32/fp64 inputs: ``addmm_``.  fp16/bf16 inputs: ``torch.addmm(grad_w, dlogits^T, h,
    out_dtype=fp32, out=grad_w)`` (the low-precision product is kept in fp32 and summed into grad_w by
    the matmul itself) where the device has that op; elsewhere (the CPU) the product is rounded to
    fp16/bf16 before the fp32 sum.  (``grad_w += torch.mm(..., out_dtype=fp32)`` would allocate and
    then re-read a (V, C) fp32 temporary per chunk: ~11 GB of extra traffic for GPT-2 at 16k tokens.)
    """
    if dlogits.dtype == grad_w.dtype:
        grad_w.addmm_(dlogits.t(), h)
        return
    kind = dlogits.device.type
    if _ADDMM_OUT_DTYPE.get(kind, True):
        try:
            torch.addmm(grad_w, dlogits.t(), h, out_dtype=grad_w.dtype, out=grad_w)
            _ADDMM_OUT_DTYPE[kind] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[kind] = False
    grad_w += dlogits.t() @ h  # product rounded to fp16/bf16 (fp32 inside the matmul), summed in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chunk_ce, hidden, weight, targets, ignore_index, chunk_rows):
        C = hidden.shape[-1]
        loss, grad_h, grad_w = fused_linear_cross_entropy(
            chunk_ce, hidden.reshape(-1, C), weight, targets.reshape(-1), ignore_index,  # (N, C), (N,)
            need_grad_hidden=ctx.needs_input_grad[1], need_grad_weight=ctx.needs_input_grad[2], chunk_rows=chunk_rows,
        )
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = dw = None
        if grad_h is not None:  # out of place, so a second backward (retain_graph) sees the same grads
            dh = (grad_h * grad_out).to(grad_h.dtype).reshape(ctx.hidden_shape)  # (..., C)
        if grad_w is not None:
            dw = (grad_w * grad_out).to(grad_w.dtype)
        return None, dh, dw, None, None, None


def linear_cross_entropy_chunked(
    chunk_ce: ChunkCE,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` by ``chunk_ce``, ``chunk_rows`` rows of logits at a time.

    hidden: (..., C); weight: (V, C), hidden's dtype; targets: hidden.shape[:-1].  Differentiable in
    hidden and weight; the gradients are formed in the forward pass.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(chunk_ce, hidden, weight, targets, ignore_index, chunk_rows)
    loss, _, _ = fused_linear_cross_entropy(
        chunk_ce, hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index,  # (N, C), (N,)
        need_grad_hidden=False, need_grad_weight=False, chunk_rows=chunk_rows,
    )
    return loss
