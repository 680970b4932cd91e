"""What a training run leaves behind besides checkpoints: ``metrics.jsonl`` and ``loss.png``.

metrics.jsonl has one JSON object per line, of three kinds:

* step records   ``{"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "dt_ms", "peak_mem_mb"}``, and
  ``"mfu_pct"`` where the device's peak FLOP/s is known (``llm/train/flops.py``)
* eval records   ``{"step", "val_loss", "val_ppl"}``  (step 0 is the model before training)
* sample records ``{"step", "sample"}``

A resumed run first drops the records past the checkpoint's step (a crashed run may have logged
steps it never saved), so the file always reads as one uninterrupted run.  Each record is also
passed to the run's ``--logger`` sinks (TensorBoard, wandb: ``llm/train/tracking.py``).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from .checkpoint import atomic_write, atomic_write_text


def read_metrics(path: str | os.PathLike, *, require_step: bool = False) -> list[dict]:
    """The records of a metrics.jsonl.  A torn last line (the run died, or the disk filled, mid-write)
    is dropped with a notice; any other line that is not a JSON object is an error naming the file
    and line, as is a record without a ``step`` when ``require_step``."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1 and not line.endswith("\n"):
                warnings.warn(f"{path}: dropped a torn last record (line {i}: the run stopped mid-write)", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i}: not a JSON record ({exc.msg}); fix or delete the line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {i}: a record must be a JSON object, got {type(record).__name__}")
        if require_step and "step" not in record:
            raise ValueError(f"{path}, line {i}: a record without \"step\": {line.strip()[:120]}")
        records.append(record)
    return records


def step_losses(records: list[dict]) -> list[float]:
    """The per-step training losses, in step order."""
    return [r["loss"] for r in records if "loss" in r]


class MetricsLog:
    """Append-only JSONL writer that also feeds ``sinks`` (objects with ``log(record)`` and
    ``close()``, see ``llm/train/tracking.py``); a no-op when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
                 sinks: list | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        self.sinks = list(sinks or []) if enabled else []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.records = [r for r in read_metrics(self.path, require_step=True) if r["step"] <= resume_step]
        # A fresh run starts a fresh log; a resumed one keeps the records up to its checkpoint.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, **record) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        """Close the sinks (flushes TensorBoard's event file, finishes the wandb run); idempotent."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def plot_losses(records: list[dict], path: str | os.PathLike, *, yardstick: float | None = None) -> None:
    """Train loss per step and val loss per eval, with the unigram yardstick as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=2, label="val loss")
    if yardstick is not None:
        ax.axhline(yardstick, ls="--", color="gray", label=f"unigram yardstick ({yardstick:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
