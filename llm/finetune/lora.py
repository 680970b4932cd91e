"""LoRA (Hu et al. 2021): fine-tune a frozen Linear through a trainable low-rank update.

    W x  ->  W x + (alpha / r) * B A x        A: (r, in), B: (out, r), W frozen

A starts Kaiming-uniform and B at zero, so a freshly wrapped model computes exactly what it did
before; only A and B (r * (in + out) numbers per layer) get gradients.  ``merge_lora`` folds
``W + (alpha / r) B A`` back into plain ``nn.Linear`` layers, after which the model is an ordinary
GPT that saves, loads and exports like any other.

The LM head is not a target by default: its weight is the token embedding (tied), and a LoRA
update on it would make the head differ from the embedding, so merging it unties the two.  When
it is wrapped anyway, ``LoRALinear.weight`` is the effective weight, which is what the model's
fused LM-head + loss (``kernels.linear_cross_entropy``) reads, so training goes through the kernel.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

__all__ = ["LoRALinear", "DEFAULT_TARGETS", "apply_lora", "merge_lora", "lora_state_dict", "load_lora_state_dict",
           "count_parameters", "describe_trainable"]

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # every Linear of attention and MLP in every block


class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # nn.Linear's own default init for A (kaiming-uniform, a=sqrt(5)), as the LoRA paper's code does
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + scaling * B A (out, in), differentiable w.r.t. A and B."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls (in -> r -> out) instead of building the (out, in) update every step.
        update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (without the dropout)."""
        w = self.base.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            delta = self.lora_B.float() @ self.lora_A.float()  # (out, in), fp32 whatever the weights' dtype
            lin.weight.copy_((w.float() + self.scaling * delta).to(w.dtype))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def _parse_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoRA targets are empty: name at least one Linear, e.g. c_attn,c_proj,c_fc")
    return targets


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, dropout: float = 0.0) -> int:
    """Freeze ``model`` and wrap every nn.Linear whose own name is in ``targets`` with LoRALinear.

    ``targets``: names like "c_attn", "c_proj", "c_fc", "lm_head" (a tuple or "a,b,c").  Returns
    the number of trainable parameters afterwards (the LoRA factors).  A target that matches no
    Linear is an error, as is applying LoRA twice.
    """
    targets = _parse_targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; merge_lora() it before applying LoRA again")
    found = {t: 0 for t in targets}
    to_wrap = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found and isinstance(module, nn.Linear):
            found[leaf] += 1
            to_wrap.append(name)
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target(s) {', '.join(missing)} match no nn.Linear in the model; "
                         f"its Linear layers are named {', '.join(linears)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in to_wrap:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout))
    return count_parameters(model, trainable_only=True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear (in place) and make all parameters trainable again.

    A merged LM head no longer equals the token embedding, so a tied GPT is untied (its config
    says ``tie_weights=False``) and save/load/export treat the head as its own weight.  Returns
    ``model``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, getattr(parent, leaf).merged())
    head_merged = any(n.rsplit(".", 1)[-1] == "lm_head" for n in names)
    if head_merged and getattr(getattr(model, "config", None), "tie_weights", False):
        model.config = dataclasses.replace(model.config, tie_weights=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors (``...lora_A`` / ``...lora_B``): a small file that needs the base model."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load factors saved by :func:`lora_state_dict` into a model that :func:`apply_lora` prepared alike."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA factors do not match the model's LoRA layers: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (apply_lora with the same targets first)")
    model.load_state_dict(state, strict=False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (a tied weight is one tensor); optionally only trainable ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model, True), count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf
