"""The optimizer and the learning-rate schedule of pretraining.

AdamW with two parameter groups, as GPT-2/3 and nanoGPT do: every 2-D (or higher) tensor -- the
Linear weights and the embeddings -- is decayed; biases and LayerNorm gains/shifts (1-D) are not,
because shrinking them towards zero only fights the normalisation and buys no regularisation.

The schedule is a pure function of the step, so a resumed run needs nothing but the step number
to continue on exactly the same curve: linear warmup to ``max_lr``, then a half cosine down to
``min_lr`` at ``max_steps``.
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed (dim >= 2) and an undecayed (dim < 2) group.

    ``named_parameters`` yields a tied tensor (token embedding == LM head) once, so it is
    optimised once.  Each group also lists its parameter names, which keeps the split testable.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def configure_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel on CUDA and on the CPU.

    Fused, the update reads each parameter, gradient and moment once and writes them once: on a CPU
    that is memory-bound work (28 bytes per parameter and step), and the default foreach version's
    several passes took 1.48 s for GPT-2 124M's parameters on 2 cores where the fused one took 0.42 s (a
    microbenchmark on freshly allocated gradients; inside a warmed-up training step the fused update
    took 87 ms).
    Both are deterministic, so CPU runs stay bitwise reproducible across resume.
    """
    groups = param_groups(model, weight_decay)
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based: the first update is step 1).

    Warmup: ``max_lr * step / warmup_steps`` for step <= warmup_steps, so step 1 never takes a
    full-size update from the still-empty Adam moments.  Then cosine from ``max_lr`` (at
    warmup_steps) to ``min_lr`` (at max_steps); past max_steps it stays at ``min_lr``.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return max_lr * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
