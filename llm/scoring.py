"""Log-probabilities of given tokens under a model: what evaluation and alignment are built on.

Multiple-choice evaluation (HellaSwag, MMLU) scores each answer by the summed log-probability of its
tokens after the context; DPO compares the summed log-probabilities of a chosen and a rejected
response under the policy and a frozen reference.  Both are :func:`sequence_logprobs` with
``targets`` set to ``ignore_index`` everywhere except the tokens being scored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import GPT

__all__ = ["sequence_logprobs", "token_logprobs"]


def token_logprobs(model: GPT, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``log p(targets[b, t] | idx[b, :t+1])`` for every position, 0 where the target is ignored.

    idx, targets: (B, T) int64, targets usually ``idx`` shifted left by one.  Returns (B, T) float32.
    Gradients flow (DPO differentiates through it); wrap in ``torch.no_grad()`` to score.
    """
    if idx.shape != targets.shape or idx.dim() != 2:
        raise ValueError(f"idx and targets must both be (B, T), got {tuple(idx.shape)} and {tuple(targets.shape)}")
    logits, _ = model(idx)  # (B, T, V)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V), fp32 whatever the model's dtype
    keep = targets != ignore_index  # (B, T)
    safe = torch.where(keep, targets, torch.zeros_like(targets))  # any valid id where ignored
    picked = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(keep, picked, torch.zeros_like(picked))


def sequence_logprobs(model: GPT, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed log-probability of each row's non-ignored targets: (B,) float32."""
    return token_logprobs(model, idx, targets, ignore_index).sum(dim=-1)
