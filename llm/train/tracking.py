"""Experiment tracking: where a run's metrics go besides ``metrics.jsonl``.

    --logger jsonl                 metrics.jsonl only (the default; it is always written)
    --logger tensorboard           also <out_dir>/tensorboard/ (view: tensorboard --logdir <out_dir>)
    --logger wandb                 also a Weights & Biases run in <out_dir>/wandb/, offline unless
                                   WANDB_MODE says otherwise (upload later with `wandb sync`)
    --logger tensorboard,wandb     both

Every record :class:`llm.train.train_log.MetricsLog` writes is passed on: a step record's numbers go
under ``train/`` (loss, lr, grad_norm, tok_per_s, mfu_pct, peak_mem_mb, ...), an evaluation's under
``eval/`` and a text sample under ``samples``, all at the record's ``step``.  Only rank 0 logs.

A resumed run continues the same curves: TensorBoard is opened with ``purge_step`` one past the
checkpoint's step, so the events a crashed run wrote after its last checkpoint are discarded when
TensorBoard reads the folder (the resumed run writes those steps again); wandb reopens the same run
(its id is kept in ``<out_dir>/wandb_run_id``) -- wandb drops a step it has already seen, so there
the steps between the last checkpoint and a crash keep their first values.
"""
from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LOGGERS", "TrackingConfig", "parse_loggers", "make_sinks", "TensorBoardSink", "WandbSink"]

LOGGERS = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR, WANDB_ID_FILE = "tensorboard", "wandb_run_id"


@dataclass
class TrackingConfig:
    """The tracking settings every training command shares (each is also a flag); ``llm pretrain``'s
    TrainConfig and the fine-tuners' FinetuneConfig inherit them."""

    logger: str = field(default="jsonl", metadata={"help": "where metrics go: jsonl (metrics.jsonl only), "
                        "tensorboard, wandb (offline unless WANDB_MODE is set), or several comma-separated"})
    wandb_project: str = field(default="llm-from-scratch", metadata={"help": "the wandb project of --logger wandb"})
    peak_tflops: float | None = field(default=None, metadata={"help": "the device's peak TFLOP/s for MFU (None: "
                                      "the bf16 datasheet peak of a known GPU; no MFU elsewhere)"})

    def validate_tracking(self) -> None:
        parse_loggers(self.logger)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0 (or unset), got {self.peak_tflops}")


def parse_loggers(spec: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ("tensorboard", "wandb"); ValueError naming an unknown logger."""
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise ValueError(f"logger must be one or more of {', '.join(LOGGERS)} (comma-separated); got {spec!r}")
    return names


def _kind(record: dict) -> str:
    if "sample" in record:
        return "samples"
    return "train" if "loss" in record else "eval"


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (not ``step``, not flags) under their ``train/`` or ``eval/`` tag."""
    kind = _kind(record)
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardSink:
    """Scalars and text samples into ``<out_dir>/tensorboard`` with PyTorch's ``SummaryWriter``."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("--logger tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[tracking]')") from exc
        self.log_dir = Path(out_dir) / TENSORBOARD_DIR
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def log(self, record: dict) -> None:
        step = record["step"]
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if "sample" in record:
            self.writer.add_text("samples", str(record["sample"]), step)
        self.writer.flush()  # a crash loses nothing that was logged

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run, offline by default (no account, no network); lazily imported."""

    def __init__(self, out_dir: str | os.PathLike, config: dict, project: str, resume_step: int | None = None):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("--logger wandb needs the wandb package: pip install wandb "
                              "(or pip install -e '.[tracking]')") from exc
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        run_id = run_id or secrets.token_hex(4)  # wandb's run ids are short [a-z0-9] strings
        self.run = wandb.init(project=project, dir=str(out_dir), config=config, id=run_id, resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))
        id_file.write_text(run_id + "\n")

    def log(self, record: dict) -> None:
        data: dict = scalars(record)
        if "sample" in record:
            data["samples"] = str(record["sample"])
        if data:
            self.run.log(data, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def make_sinks(spec: str, out_dir: str | os.PathLike, config: dict, *, resume_step: int | None = None,
               wandb_project: str = "llm-from-scratch") -> list:
    """The sinks ``spec`` names besides jsonl (which :class:`~llm.train.train_log.MetricsLog` writes itself)."""
    sinks = []
    try:
        for name in parse_loggers(spec):
            if name == "tensorboard":
                sinks.append(TensorBoardSink(out_dir, resume_step))
            elif name == "wandb":
                sinks.append(WandbSink(out_dir, config, wandb_project, resume_step))
    except BaseException:
        for sink in sinks:  # the ones opened before the failure
            sink.close()
        raise
    return sinks
