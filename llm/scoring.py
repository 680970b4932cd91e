"""Log-probabilities of given tokens under a model: what evaluation and alignment are built on.

Multiple-choice evaluation (HellaSwag, MMLU) scores each answer by the summed log-probability of its
tokens after the context; DPO compares the summed log-probabilities of a chosen and a rejected
response under the policy and a frozen reference.  Both are :func:`sequence_logprobs` with
``targets`` set to ``ignore_index`` everywhere except the tokens being scored.

Why chunked: full (B, T, V) logits plus their fp32 log-softmax are two V-wide tensors per token
(2 x 4 x 50257 bytes = 400 KB a token for GPT-2, 400 MB at B*T = 1024) and dominate DPO's memory.
Instead the model runs to its final hidden states (B, T, C) (``GPT.forward(idx, return_hidden=True)``,
which never applies the head), and the head is applied ``chunk_size``
rows at a time: logits of the chunk -> fp32 -> logsumexp -> gather.  With gradients on, each chunk is
wrapped in a non-reentrant ``torch.utils.checkpoint``: only the chunk's (rows, C) hidden states are
kept for backward, which recomputes that chunk's logits alone.  Peak memory is O(chunk_size x V), not
O(B x T x V).  (``kernels.linear_cross_entropy`` fuses the same head + softmax but returns only the
mean loss, not per-token values, so it cannot serve here.)

Precision: the head is called as the module it is (``model.lm_head``: nn.Linear, tied or untied, or a
LoRA wrapper), so under autocast its matmul runs in the autocast dtype exactly as ``model(idx)``
would; its output is upcast to fp32 before the logsumexp.  The values equal the unfused
``log_softmax(model(idx)[0].float())`` up to fp32 rounding.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from .model import GPT

__all__ = ["sequence_logprobs", "token_logprobs", "final_hidden_states"]

# Elements of one chunk's logits (rows x V): 2**23 fp32 values = 32 MB, ~166 rows at V = 50257.  The
# backward holds ~4 such buffers at once (recomputed logits, gather's and logsumexp's gradients, their
# sum), so the peak is ~130 MB whatever B*T is.
_CHUNK_ELEMS = 2**23


def final_hidden_states(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The output of ``model.transformer.ln_f`` for ``idx``: (B, T, C), without the LM head.
    ``model`` may be wrapped (DistributedDataParallel, torch.compile): the call goes through the wrapper."""
    return model(idx, return_hidden=True)[0]


def unwrap(model):
    """The module inside DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _has_head(model) -> bool:
    """A GPT (final norm ``transformer.ln_f`` then ``lm_head``), whose head can be applied in chunks."""
    model = unwrap(model)
    transformer = getattr(model, "transformer", None)
    return hasattr(model, "lm_head") and transformer is not None and hasattr(transformer, "ln_f")


def _chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """log softmax(head(h))[safe] for one chunk: h (rows, C), safe (rows,) valid ids -> (rows,) fp32."""
    logits = head(h).float()  # (rows, V), the only V-wide tensors: this and its exp inside logsumexp
    return logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    model: GPT, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk_size: int | None = None
) -> torch.Tensor:
    """``log p(targets[b, t] | idx[b, :t+1])`` for every position, 0 where the target is ignored.

    idx, targets: (B, T) int64, targets usually ``idx`` shifted left by one.  Returns (B, T) float32.
    Gradients flow (DPO differentiates through it); wrap in ``torch.no_grad()`` to score.
    ``chunk_size``: token rows whose logits exist at once (default ``2**23 // V``).
    """
    if idx.shape != targets.shape or idx.dim() != 2:
        raise ValueError(f"idx and targets must both be (B, T), got {tuple(idx.shape)} and {tuple(targets.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keep2d = targets != ignore_index
    if not _has_head(model):  # any callable returning (logits, _): the plain full-logits computation
        logits, _ = model(idx)  # (B, T, V)
        safe2d = torch.where(keep2d, targets, torch.zeros_like(targets))
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe2d.unsqueeze(-1)).squeeze(-1)
        return torch.where(keep2d, picked, torch.zeros_like(picked))
    B, T = idx.shape
    hidden = final_hidden_states(model, idx)
    hidden = hidden.reshape(B * T, hidden.shape[-1])  # (N, C)
    flat = targets.reshape(-1)  # (N,)
    keep = flat != ignore_index
    safe = torch.where(keep, flat, torch.zeros_like(flat))  # any valid id where ignored
    V = unwrap(model).config.vocab_size
    rows = max(1, min(B * T, chunk_size or _CHUNK_ELEMS // V))
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    head = unwrap(model).lm_head
    parts = []
    for start in range(0, B * T, rows):
        h, s = hidden[start : start + rows], safe[start : start + rows]
        if recompute:  # keep only h for backward; the chunk's logits are formed again there
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, s, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h, s))
    picked = torch.cat(parts)  # (N,)
    return torch.where(keep, picked, torch.zeros_like(picked)).reshape(B, T)


def sequence_logprobs(
    model: GPT, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, chunk_size: int | None = None
) -> torch.Tensor:
    """Summed log-probability of each row's non-ignored targets: (B,) float32."""
    return token_logprobs(model, idx, targets, ignore_index, chunk_size).sum(dim=-1)
