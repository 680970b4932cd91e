"""Evaluation on a benchmark while pretraining: ``llm pretrain --eval-task mc:hellaswag_val.jsonl --eval-every 250``.

``mc:FILE`` is multiple choice by log-likelihood (``llm/eval/multiple_choice.py``: our JSONL, HellaSwag's
JSONL, or MMLU's CSV), scored as ``llm eval mc`` scores it, zero-shot.  The items are split over the
ranks (rank r takes items r, r + W, ...) and the hit counts summed, so N GPUs score a file N times
faster; the result, ``mc_acc`` and ``mc_acc_norm`` (HellaSwag's usual metric), is logged beside the
val loss (``eval/`` in TensorBoard and wandb).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import distributed

KINDS = ("mc",)


def parse_eval_task(spec: str) -> tuple[str, Path]:
    """``"mc:FILE"`` -> ("mc", FILE); ValueError naming what is wrong."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise ValueError(f"eval_task must be KIND:FILE with KIND one of {', '.join(KINDS)} (e.g. mc:hellaswag_val.jsonl), "
                         f"got {spec!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--eval-task {spec}: no such file {path}")
    return kind, Path(path)


class TaskEval:
    """This rank's share of the task's items, and the function that scores them."""

    def __init__(self, spec: str, limit: int | None, dist: distributed.DistInfo, equal_shares: bool = False):
        from ..eval.multiple_choice import load_items

        _, path = parse_eval_task(spec)
        items = load_items(path)[:limit]
        if not items:
            raise ValueError(f"--eval-task {spec}: the file has no items")
        self.n_total, self.dist = len(items), dist
        self.items = items[dist.rank::dist.world_size]
        # Under FSDP every forward gathers weights from every rank, so all ranks must run as many: the
        # shorter shares are topped up with items scored but not counted.
        self.counted = len(self.items)
        if equal_shares:
            per = -(-len(items) // dist.world_size)
            self.items += [items[0]] * (per - len(self.items))

    @torch.no_grad()
    def __call__(self, model, tokenizer, autocast, device) -> dict:
        from ..eval.multiple_choice import evaluate_multiple_choice

        was_training = model.training
        model.eval()
        hits = torch.zeros(3, dtype=torch.float64, device=device)  # acc hits, acc_norm hits, items
        if self.items:
            with autocast():
                scored = evaluate_multiple_choice(model, tokenizer, self.items, progress=False)["items"][:self.counted]
            hits += torch.tensor([sum(r["pred"] == r["label"] for r in scored),
                                  sum(r["pred_norm"] == r["label"] for r in scored), len(scored)],
                                 dtype=torch.float64, device=device)
        total = distributed.all_reduce_mean(hits, self.dist) * self.dist.world_size
        model.train(was_training)
        acc, acc_norm, n = total.tolist()
        return {"mc_acc": acc / n, "mc_acc_norm": acc_norm / n, "mc_items": int(round(n))}
