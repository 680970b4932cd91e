"""Pretraining: next-token prediction on a tokenized corpus, from scratch or from GPT-2 weights.

    from llm.train.pretrain import TrainConfig, train
    summary = train(TrainConfig(preset="tiny", data="the-verdict", max_steps=50))

One loop in the shape of nanoGPT's ``train.py``: AdamW with decay/no-decay groups, linear warmup
then cosine decay, gradient accumulation and clipping, bf16 (or fp16 with loss scaling) autocast, optional
``torch.compile``, periodic validation and text samples, and atomic checkpoints.  Under
``torchrun`` the same code runs data-parallel (``llm/train/distributed.py``).

Resuming is bitwise on CPU because (1) the schedule is a function of the step alone, (2) every RNG
the loop draws from -- dropout (torch), data order (the loader's own state), Python and NumPy -- is
saved and restored, and (3) evaluation and sampling draw from none of them: eval runs in eval mode
on fixed windows, and samples use their own seeded ``torch.Generator``.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from tqdm.auto import tqdm

from kernels import BACKENDS

from . import distributed, flops, train_setup
from .checkpoint import (FORMAT, CheckpointError, RunLock, atomic_save, capture_rng, check_resumable,
                         check_resume_settings, load_checkpoint, load_model, remove_stale_temps, restore_rank_rng,
                         to_plain)
from .optim import configure_optimizer, lr_at, set_lr
from .tracking import TENSORBOARD_DIR, WANDB_ID_FILE, TrackingConfig, make_sinks
from .train_log import MetricsLog, plot_losses

__all__ = ["TrainConfig", "train", "resume_config", "NonFiniteLossError", "CheckpointError", "load_checkpoint", "load_model"]

CKPT_NAME, METRICS_NAME, PLOT_NAME = "ckpt.pt", "metrics.jsonl", "loss.png"
# The allowed values of the string fields that are not free-form (the CLI offers them as choices).
CHOICES = {"dtype": train_setup.DTYPES, "loader": ("auto", "random", "sliding", "shards"),
           "kernels": BACKENDS}


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig(TrackingConfig):
    """Every knob of a pretraining run; each field is also a ``python -m llm pretrain`` flag
    (the tracking ones, --logger, --wandb-project and --peak-tflops, come from ``llm/train/tracking.py``)."""

    # -- data and output
    out_dir: str = _opt("out", "folder for ckpt.pt, metrics.jsonl and loss.png")
    data: str = _opt("tinyshakespeare", "corpus name, text file, folder, glob, hf:<dataset>, or a folder "
                                        "that llm prepare wrote (token files, or --shards)")
    tokenizer: str | None = _opt(None, "'gpt2' or the path of a Hugging Face tokenizer.json, or of a folder holding "
                                       "one; a model from scratch gets its vocab_size (None: the --init-from "
                                       "folder's tokenizer.json if it has one, else gpt2)")
    val_fraction: float = _opt(0.1, "share of the corpus held out for validation")
    init_from: str = _opt("scratch", "'scratch' or a Hugging Face GPT-2 folder to start from")
    resume: bool = _opt(False, "continue from <out_dir>/ckpt.pt (model, optimizer, RNG, data position)")
    overwrite: bool = _opt(False, "start over even if <out_dir>/ckpt.pt exists (deletes its ckpt.pt, metrics.jsonl, loss.png)")
    # -- model: a preset plus optional overrides (None keeps the preset's value)
    preset: str = _opt("cpu-small", "model preset (see llm.model.PRESETS)")
    n_layer: int | None = _opt(None, "override the preset's number of layers")
    n_head: int | None = _opt(None, "override the preset's number of attention heads")
    n_embd: int | None = _opt(None, "override the preset's embedding width")
    dropout: float | None = _opt(None, "override the preset's dropout")
    bias: bool | None = _opt(None, "override whether Linear/LayerNorm layers have biases")
    block_size: int | None = _opt(None, "context length of the training windows (None: the model's block_size)")
    # -- optimisation
    batch_size: int = _opt(4, "sequences per micro-batch per process")
    grad_accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _opt(500, "optimizer steps (the cosine schedule ends here)")
    lr: float = _opt(1.5e-3, "peak learning rate")
    min_lr: float = _opt(1.5e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(20, "steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay (2-D weights only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    # -- evaluation, samples, checkpoints, logs
    eval_interval: int = _opt(100, "steps between validation runs (0: only before and after)")
    eval_iters: int = _opt(20, "at most this many val batches per evaluation")
    eval_task: str | None = _opt(None, "also score a benchmark while training: mc:FILE (multiple choice: our JSONL, "
                                       "HellaSwag's JSONL or MMLU's CSV), logged as mc_acc / mc_acc_norm")
    eval_every: int = _opt(0, "steps between --eval-task evaluations (0: with every validation run)")
    eval_task_limit: int | None = _opt(None, "score only the first N items of --eval-task")
    sample_interval: int = _opt(0, "steps between text samples (0: only at the end)")
    sample_prompt: str = _opt("ROMEO:", "prompt of the text samples")
    sample_tokens: int = _opt(64, "tokens per text sample (0: no samples)")
    checkpoint_interval: int = _opt(100, "steps between checkpoints (0: only at the end)")
    progress: bool = _opt(True, "show a progress bar")
    # -- system
    seed: int = _opt(1337, "seed of every RNG")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = _opt("auto", "auto (bf16 autocast on a GPU with bf16, else fp16 with loss scaling; fp32 on "
                              "CPU and MPS), float32, bfloat16 or float16 (autocast with a GradScaler)")
    compile: bool = _opt(False, "torch.compile the model")
    fsdp: bool = _opt(False, "shard weights, gradients and optimizer state over the processes (FSDP2, one unit per "
                             "block; sharded checkpoints that resume on any number of processes); under torchrun")
    activation_checkpointing: bool = _opt(False, "recompute each transformer block's activations in backward "
                                                 "instead of keeping them (less memory, ~1/3 more compute)")
    memory_check: bool = _opt(True, "refuse a run whose memory estimate exceeds the device's memory")
    kernels: str = _opt("auto", "kernels backend: auto, torch (reference), pytorch (PyTorch's own ops), triton or cuda")
    loader: str = _opt("auto", "window sampling: random, sliding, or auto (sliding when the run covers the data; "
                               "shards, in order, for a folder of llm prepare --shards)")

    def validate(self) -> None:
        self.validate_tracking()
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_task is not None:
            from .task_eval import parse_eval_task

            parse_eval_task(self.eval_task)
        if self.eval_task_limit is not None and self.eval_task_limit < 1:
            raise ValueError(f"eval_task_limit must be >= 1 (or unset), got {self.eval_task_limit}")
        for name in ("warmup_steps", "eval_interval", "sample_interval", "sample_tokens", "checkpoint_interval",
                     "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or start it over")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lr > 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):  # a negative grad_clip would silently disable clipping
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.fsdp and self.dtype == "float16":
            raise ValueError("--fsdp runs in bfloat16 or float32: fp16's loss scaler does not handle sharded gradients")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# Settings a resumed run must keep: they decide the model or the stream of training batches, so a
# change would not continue the run but silently start a different one.
FIXED_ON_RESUME = ("preset", "n_layer", "n_head", "n_embd", "dropout", "bias", "init_from", "block_size",
                   "data", "val_fraction", "loader", "seed", "batch_size", "grad_accum_steps", "tokenizer")
# Settings that say how to run, not what: never reported as changes.
NOT_COMPARED_ON_RESUME = ("out_dir", "resume", "overwrite")


def resume_config(saved: dict, overrides: dict) -> TrainConfig:
    """The config of a resumed run: the checkpoint's ``train_config`` with ``overrides`` on top.

    ``overrides`` are the settings the user actually asked for (the CLI passes the flags typed);
    everything else continues as the run was started.  Whether an override is allowed is checked
    when training starts (:func:`check_resume_config`).
    """
    names = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in saved.items() if k in names}  # a field added since keeps its default
    # overwrite is about how a run starts, never inherited (typed with --resume, validate() refuses it)
    return TrainConfig(**{**base, "overwrite": False, **overrides, "resume": True})


def check_resume_config(saved: dict, cfg: TrainConfig, saved_world_size: int = 1,
                        world_size: int = 1) -> dict[str, tuple]:
    """Compare a resumed run's ``cfg`` with the checkpoint's ``train_config``.

    Raises ValueError naming the flag and both values when a :data:`FIXED_ON_RESUME` setting
    differs; returns ``{name: (saved, now)}`` of the other settings that changed.  ``batch_size``
    is per process, so what must stay is ``batch_size * world_size`` (the loader's global batch).
    """
    now = {k: v for k, v in asdict(cfg).items() if k not in NOT_COMPARED_ON_RESUME}
    return check_resume_settings(saved, now, FIXED_ON_RESUME.__contains__, saved_world_size, world_size)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stopped before that step's update and saved nothing."""

    def __init__(self, step: int, loss: float, checkpoint: Path):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        kept = (f"the last good checkpoint {checkpoint} is kept as it was" if checkpoint.exists()
                else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss ({loss}) at step {step}: training stopped and {kept}; "
                         "try a lower --lr, then --resume")


def train(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run pretraining as ``cfg`` says; return the summary dict of :meth:`Trainer.summary`.

    ``on_step(step, record)`` is called after every optimizer step, once that step's evaluation
    and checkpoint are done; raising from it stops the run the way a crash or Ctrl-C would.
    Raises :class:`NonFiniteLossError` on a NaN/inf loss, :class:`CheckpointError` when
    ``cfg.resume`` finds no usable checkpoint, FileExistsError when a fresh run would overwrite one.

    With ``cfg.resume`` the config must describe the same run as the checkpoint's (ValueError
    otherwise); only settings like ``max_steps``, ``lr`` or the intervals may change.  To take
    the saved settings and override a few, build ``cfg`` with :func:`resume_config` (the CLI does).
    """
    cfg.validate()
    device = train_setup.resolve_device(cfg.device)
    dist = distributed.setup(device.type, always=cfg.fsdp)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        lock = RunLock(cfg.out_dir) if dist.is_main else contextlib.nullcontext()
        with lock, train_setup.kernels_backend(cfg.kernels):
            return Trainer(cfg, device, dist, on_step).run()
    finally:
        distributed.teardown(dist)


class Trainer:
    """One run's state.  ``__init__`` builds everything (resuming if asked); ``run`` loops."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: distributed.DistInfo, on_step=None):
        self.cfg, self.device, self.dist, self.on_step = cfg, device, dist, on_step
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / CKPT_NAME
        self.t_start = time.perf_counter()
        if device.type == "cpu":
            train_setup.set_cpu_threads()
            train_setup.keep_freed_memory()
        else:
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left on CUDA
            torch.backends.cudnn.allow_tf32 = True
        train_setup.seed_everything(cfg.seed)
        ckpt = self._load_resume_checkpoint()
        if dist.is_main:
            remove_stale_temps(self.ckpt_path)  # temp files of checkpoints killed mid-write

        from ..tokenizer import GPT2, check_vocab_fits, folder_tokenizer, get_tokenizer

        # Not given: a Hugging Face folder's own tokenizer.json (Llama 3, Qwen3), or GPT-2's.
        default = GPT2 if cfg.init_from == "scratch" else folder_tokenizer(cfg.init_from)
        self.tokenizer = get_tokenizer(cfg.tokenizer or default)
        self._prepare_data()
        if ckpt is not None:
            self._check_same_data(ckpt)
        planned = train_setup.planned_block_size(cfg, ckpt)
        if planned is not None:  # fail before building the model when the splits are too short
            self._check_split_lengths(planned)
        self.precision = train_setup.choose_precision(device, cfg.dtype)
        vocab = None if self.tokenizer.name == GPT2 else self.tokenizer.n_vocab  # from scratch: the tokenizer's
        model = train_setup.build_model(cfg, ckpt, vocab_size=vocab)
        check_vocab_fits(model.config.vocab_size, self.tokenizer)
        model.activation_checkpointing = cfg.activation_checkpointing
        self.memory_note = self._check_memory(model, planned or cfg.block_size or model.config.block_size)
        self.raw_model = model.to(device)
        self.block_size = cfg.block_size or self.raw_model.config.block_size
        if self.block_size > self.raw_model.config.block_size:
            raise ValueError(f"block_size {self.block_size} exceeds the model's {self.raw_model.config.block_size}")
        if planned is None:  # a Hugging Face folder's window length is known only now
            self._check_split_lengths(self.block_size)
        if cfg.fsdp:  # before the optimizer, which must see the sharded parameters
            from . import fsdp

            if self.precision.name == "float16":
                raise ValueError("--fsdp runs in bfloat16 or float32 (this device's auto precision is float16): "
                                 "pass --dtype float32")
            fsdp.shard_model(self.raw_model, device, self.precision.name)
        self.optimizer = configure_optimizer(self.raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             betas=(cfg.beta1, cfg.beta2), device_type=device.type)
        self.tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum_steps * dist.world_size
        self.loader_mode = "shards" if self.shards is not None else ckpt["loader_mode"] if ckpt else \
            train_setup.choose_loader_mode(cfg.loader, len(self.train_tokens), self.tokens_per_step, cfg.max_steps)
        self.loader = self._make_loader(self.train_tokens, self.loader_mode)
        self.autocast, self.compute_dtype = self.precision.autocast, self.precision.name
        self.unigram = float(self.data.unigram_loss(self.train_tokens, self.val_tokens, self.raw_model.config.vocab_size))

        self.step, self.tokens_seen, self.initial_val_loss = 0, 0, None
        if ckpt is not None:
            self._restore(ckpt)
        elif dist.rank > 0:
            torch.manual_seed(cfg.seed + dist.rank)  # rank 0 matches a 1-process run; others get own dropout masks
        self.model = self._wrap(self.raw_model)
        self._clear_out_dir()  # only now: a bad flag or a typo in --data must not have cost the old run
        resume_step = self.step if ckpt is not None else None
        sinks = make_sinks(cfg.logger, self.out_dir, asdict(cfg), resume_step=resume_step,
                           wandb_project=cfg.wandb_project) if dist.is_main else []
        self.metrics = MetricsLog(self.out_dir / METRICS_NAME, enabled=dist.is_main, resume_step=resume_step,
                                  sinks=sinks)
        self.task_eval = None
        if cfg.eval_task is not None:
            from .task_eval import TaskEval

            self.task_eval = TaskEval(cfg.eval_task, cfg.eval_task_limit, dist, equal_shares=cfg.fsdp)
        self.flops_per_token = flops.flops_per_token(self.raw_model, self.block_size)
        self.peak_tflops = cfg.peak_tflops or flops.peak_tflops(device)
        self.losses: list[float] = []
        self.last_val_loss, self.last_eval_step = None, -1

    # -- construction ---------------------------------------------------------------------------

    def _load_resume_checkpoint(self) -> dict | None:
        if not self.cfg.resume:
            if self.ckpt_path.exists() and not self.cfg.overwrite:
                raise FileExistsError(f"{self.ckpt_path} exists: pass --resume to continue it, --overwrite to "
                                      "start over, or a different --out-dir")
            return None
        if not self.ckpt_path.is_file():
            raise CheckpointError(f"cannot resume: no checkpoint at {self.ckpt_path}")
        ckpt = load_checkpoint(self.ckpt_path)
        if "optimizer" not in ckpt or "train_config" not in ckpt:
            kind = ckpt.get("kind", "unknown")
            raise CheckpointError(f"cannot resume from {self.ckpt_path}: it is not a pretraining checkpoint (kind "
                                  f"{kind!r}, no optimizer or training state); use a fresh --out-dir")
        check_resumable(ckpt, self.ckpt_path)
        changed = check_resume_config(ckpt.get("train_config", {}), self.cfg, ckpt.get("world_size", 1),
                                      self.dist.world_size)
        for name, (was, now) in changed.items():
            self._print(f"resume: {name} changed from {was!r} to {now!r}")
        return ckpt

    def _check_memory(self, model, block_size: int) -> str:
        """The memory estimate line printed at start; raises ValueError, naming the flags to change,
        when even the estimate does not fit in the device's memory (unless --no-memory-check)."""
        from kernels.backends import backend_for

        from . import memory

        cfg, c = self.cfg, model.config
        # Shape-only stand-ins of the two ops' inputs: on the CPU "auto" picks a backend by shape and dtype.
        dtype = torch.float32 if self.precision.name == "float32" else self.precision.dtype
        hidden = torch.empty(cfg.batch_size * block_size, c.n_embd, device="meta", dtype=dtype)
        head = torch.empty(c.vocab_size, c.n_embd, device="meta", dtype=dtype)
        q = torch.empty(cfg.batch_size, c.n_head, block_size, c.head_dim, device="meta", dtype=dtype)
        est = memory.estimate_training_memory(
            c, model.num_parameters(), batch_size=cfg.batch_size, block_size=block_size,
            precision=self.precision.name, ce_backend=backend_for("linear_cross_entropy", self.device, hidden, head),
            attention_backend=backend_for("causal_attention", self.device, q), world_size=self.dist.world_size,
            fsdp=cfg.fsdp)
        capacity = memory.device_memory(self.device)
        why = memory.refusal(est, checkpointing=cfg.activation_checkpointing, capacity=capacity, device=self.device,
                             batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                             precision=self.precision.name)
        if why and cfg.memory_check:
            raise ValueError(why)
        return est.describe(cfg.activation_checkpointing, self.device, capacity)

    def _clear_out_dir(self) -> None:
        """Rank 0, with --overwrite: delete the old run's files, so that the folder never mixes two
        runs.  Called once the data, the model and every setting have been checked."""
        if self.dist.is_main and self.cfg.overwrite:
            for name in (CKPT_NAME, METRICS_NAME, PLOT_NAME, WANDB_ID_FILE):
                (self.out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / TENSORBOARD_DIR, ignore_errors=True)
            for sharded in self.out_dir.glob("ckpt_fsdp-*"):
                shutil.rmtree(sharded, ignore_errors=True)

    def _check_same_data(self, ckpt: dict) -> None:
        """Resuming on other data than the run started on (a corpus edited in place, even to the same
        token count) would continue silently on a different stream: compare the input's sha256."""
        was = (ckpt.get("data_meta") or {}).get("sha256")
        now = self.prepared.meta.get("sha256")
        if was and now and was != now:
            raise CheckpointError(
                f"cannot resume {self.ckpt_path}: the training data changed since the run started "
                f"(--data {self.cfg.data}: sha256 {now[:16]}... now, {was[:16]}... in the checkpoint); "
                "put the original data back, or start a new run with --overwrite or another --out-dir")
        if ckpt.get("data_meta"):  # a tokenizer.json edited in place since: same name, other ids
            self.data.check_tokenizer(ckpt["data_meta"], self.tokenizer, f"the run in {self.ckpt_path}")

    def _check_split_lengths(self, block_size: int) -> None:
        """A clear error when a split cannot hold one window (the loader's own error blames the data)."""
        for split, tokens, hint in (("training", self.train_tokens, "lower --val-fraction"),
                                    ("validation", self.val_tokens, "raise --val-fraction")):
            if len(tokens) < block_size + 1:
                raise ValueError(f"the {split} split has {len(tokens)} tokens (val_fraction={self.cfg.val_fraction}), "
                                 f"fewer than block_size + 1 = {block_size + 1}; {hint} or lower --block-size")

    def _prepare_data(self) -> None:
        from .. import data
        from ..data import shards

        self.data = data
        self.shards = None
        if shards.is_shard_folder(self.cfg.data):  # `llm prepare ... --shards DIR`: read in order, shard by shard
            if self.cfg.loader not in ("auto", "shards"):
                raise ValueError(f"--data {self.cfg.data} is a shard folder, read in order: drop --loader {self.cfg.loader}")
            self.shards = shards.load_shards(self.cfg.data, self.tokenizer)
            if not self.shards.val_paths or not self.shards.train_paths:
                raise ValueError(f"{self.cfg.data} needs validation and training shards (llm prepare --val-shards >= 1 "
                                 "and more tokens than the validation shards hold)")
            self.prepared = self.shards
            # the first shard of each split stands for its split where a sample is needed (unigram, eval)
            self.train_tokens = shards.open_shard(self.shards.train_paths[0])
            self.val_tokens = shards.open_shard(self.shards.val_paths[0])
            return
        if self.cfg.loader == "shards":
            raise ValueError(f"--loader shards reads a folder of `llm prepare --shards`; --data {self.cfg.data} is not one")
        # Rank 0 tokenizes (and caches) first; the others then read its cache instead of racing it.
        if not self.dist.is_main:
            torch.distributed.barrier()
        prepared = data.prepare(self.cfg.data, val_fraction=self.cfg.val_fraction, tokenizer=self.tokenizer,
                                progress=self.cfg.progress and self.dist.is_main)
        if self.dist.is_main and self.dist.enabled:
            torch.distributed.barrier()
        self.prepared = prepared
        self.train_tokens, self.val_tokens = prepared.train_tokens(), prepared.val_tokens()

    def _make_loader(self, tokens, mode: str, batch_size: int | None = None, **kw):
        if mode == "shards":
            return self.data.shards.ShardLoader(self.shards.train_paths, batch_size or self.cfg.batch_size,
                                                self.block_size, rank=self.dist.rank, world_size=self.dist.world_size)
        return self.data.TokenLoader(tokens, batch_size or self.cfg.batch_size, self.block_size, mode=mode,
                                     seed=self.cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size, **kw)

    def _restore(self, ckpt: dict) -> None:
        if self.cfg.fsdp or ckpt.get("sharded_state"):
            if not (self.cfg.fsdp and ckpt.get("sharded_state")):
                raise CheckpointError(f"{self.ckpt_path} was written " + ("with" if ckpt.get("sharded_state") else "without")
                                      + " --fsdp: resume it the same way")
            from . import fsdp

            fsdp.load_sharded(self.raw_model, self.optimizer, self.out_dir / ckpt["sharded_state"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.precision.scaler.is_enabled() and ckpt.get("grad_scaler"):  # fp16 then and now: same scale
            self.precision.scaler.load_state_dict(ckpt["grad_scaler"])
        self.loader.load_state_dict(ckpt["loader"])
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens"]
        self.initial_val_loss = ckpt["initial_val_loss"]
        restore_rank_rng(ckpt["rng"], self.dist.rank, self.dist.world_size, self.cfg.seed, self.step)
        self._print(f"resumed from {self.ckpt_path} at step {self.step}")

    def _wrap(self, model):
        if self.cfg.compile:
            model = torch.compile(model)
        self.eval_model = model  # compiled (if asked) but not DDP-wrapped: eval needs no gradient sync
        if self.dist.enabled and not self.cfg.fsdp:  # (FSDP reduce-scatters the gradients itself)
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        self._print(f"model: {self.raw_model.num_parameters() / 1e6:.2f}M parameters, "
                    f"{self.raw_model.config.n_layer} layers, n_embd {self.raw_model.config.n_embd}; "
                    f"{self.tokens_per_step} tokens/step, {self.loader_mode} windows of {self.block_size}, "
                    f"{self.device} {self.compute_dtype}, world size {self.dist.world_size}")
        self._print(self.precision.describe())
        self._print(self.memory_note)
        self._print(f"unigram yardstick (val loss of predicting token frequencies): {self.unigram:.4f}")
        if self.initial_val_loss is None:
            self.initial_val_loss = self._log_eval()
            if self.task_eval is not None and cfg.eval_every:
                self._log_task_eval()
        self._print(f"val loss before training: {self.initial_val_loss:.4f}")
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main))
        self.t_loop = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                record = self._train_step(self.step + 1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_per_s']:.0f}", refresh=False)
                bar.update(1)
                self._after_step(record)
            bar.close()
            self.loop_seconds = time.perf_counter() - self.t_loop
            if self.last_eval_step != self.step:
                self._log_eval()
            final_sample = self._sample() if cfg.sample_tokens > 0 else None
            self._plot()
        finally:
            bar.close()
            self.metrics.close()  # what was logged stays in the TensorBoard / wandb files, crash or not
        return self.summary(final_sample)

    def _train_step(self, step: int) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the metrics record."""
        cfg, t0 = self.cfg, time.perf_counter()
        lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = self._to_device(*self.loader.next_batch())
            # DDP all-reduces gradients during backward; on all but the last micro-step that would be
            # wasted traffic, so no_sync lets them accumulate locally first.
            last = micro == cfg.grad_accum_steps - 1
            sync = contextlib.nullcontext()
            if self.cfg.fsdp:
                self.raw_model.set_requires_gradient_sync(last)  # FSDP: reduce-scatter on the last micro-step only
            elif self.dist.enabled and not last:
                sync = self.model.no_sync()
            with sync:
                with self.autocast():
                    _, loss = self.model(x, y)
                # The mean over micro-batches is the mean over the whole (global) batch.
                loss = loss / cfg.grad_accum_steps
                self.precision.backward(loss)  # fp16: the loss times the scale
            loss_sum += loss.detach()
        loss_value = distributed.all_reduce_mean(loss_sum, self.dist).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(step, loss_value, self.ckpt_path)
        # Unscale (fp16), clip, step -- or, when fp16 gradients overflowed, skip the step and lower the scale.
        grad_norm, skipped = self.precision.step(self.optimizer, self.raw_model.parameters(), cfg.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)

        self.step, self.tokens_seen = step, self.tokens_seen + self.tokens_per_step
        dt = time.perf_counter() - t0
        self.losses.append(loss_value)
        record = dict(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens=self.tokens_seen,
                      tok_per_s=self.tokens_per_step / dt, dt_ms=1000 * dt)
        record.update(flops.step_performance(record["tok_per_s"] / self.dist.world_size, self.flops_per_token,
                                       self.peak_tflops, self.device))
        record.update(self.precision.metrics(skipped))
        self.metrics.log(**record)
        return record

    def _after_step(self, record: dict) -> None:
        cfg, step = self.cfg, self.step
        if cfg.eval_interval and step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val = self._log_eval()
            self._print(f"step {step}: train loss {record['loss']:.4f}, val loss {val:.4f} "
                        f"(ppl {math.exp(val):.1f})")
            self._plot()
        if self.task_eval is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            self._log_task_eval()
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
            self.save_checkpoint()
        if cfg.sample_interval and step % cfg.sample_interval == 0 and step != cfg.max_steps:
            self._sample()
        if self.on_step is not None:
            self.on_step(step, record)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    # -- evaluation, samples, checkpoints --------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val loss over the first ``eval_iters`` batches of consecutive val windows.

        The same windows every time (a fresh sliding loader), so evaluations are comparable and
        draw from no RNG; each rank scores its slice and the means are averaged over ranks.
        """
        self.raw_model.eval()
        loader = self._make_loader(self.val_tokens, "sliding", shuffle=False)
        # Whole batches within one pass over the val split (floor): a partial last batch would wrap
        # around and score the first windows twice.  A split smaller than one global batch gets a
        # smaller batch instead; windows repeat only if there are fewer of them than ranks.
        per_rank = max(1, min(loader.batch_size, loader.n_windows // self.dist.world_size))
        if per_rank != loader.batch_size:
            loader = self._make_loader(self.val_tokens, "sliding", batch_size=per_rank, shuffle=False)
        n = max(1, min(self.cfg.eval_iters, loader.n_windows // loader.global_batch_size))
        total = torch.zeros((), device=self.device)
        for _ in range(n):
            x, y = self._to_device(*loader.next_batch())
            with self.autocast():
                _, loss = self.eval_model(x, y)
            total += loss.float()
        self.raw_model.train()
        return distributed.all_reduce_mean(total / n, self.dist).item()

    def _log_eval(self) -> float:
        val = self.evaluate()
        self.last_val_loss, self.last_eval_step = val, self.step
        self.metrics.log(step=self.step, val_loss=val, val_ppl=math.exp(min(val, 50.0)))
        if self.task_eval is not None and not self.cfg.eval_every:
            self._log_task_eval()
        return val

    def _log_task_eval(self) -> None:
        """--eval-task on every rank's share of the items, logged (rank 0) beside the val loss."""
        result = self.task_eval(self.raw_model, self.tokenizer, self.autocast, self.device)
        self.metrics.log(step=self.step, **result)
        self._print(f"step {self.step}: {self.cfg.eval_task} acc {result['mc_acc']:.4f}, acc_norm "
                    f"{result['mc_acc_norm']:.4f} ({result['mc_items']} items)")

    @torch.no_grad()
    def _sample(self) -> str | None:
        """A short continuation of ``sample_prompt``, printed and logged (rank 0 only; under --fsdp every
        rank generates it, as every forward needs every rank's shards)."""
        if not self.dist.is_main and not self.cfg.fsdp:
            return None
        from ..generate import generate_text

        cfg = self.cfg
        # Its own generator, seeded by the step: sampling never shifts the training RNG streams.
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + self.step)
        self.raw_model.eval()
        with self.autocast():
            text = generate_text(self.raw_model, self.tokenizer, [cfg.sample_prompt], cfg.sample_tokens,
                                 temperature=0.8, top_k=200, generator=gen)[0]
        self.raw_model.train()
        self._print(f"--- sample at step {self.step} ---\n{text}\n---")
        self.metrics.log(step=self.step, sample=text)
        return text

    def save_checkpoint(self) -> None:
        """Atomically write ``ckpt.pt`` (every rank takes part: RNG states are gathered; under --fsdp the
        sharded weights and optimizer state go to their own folder first, llm/train/fsdp.py)."""
        rng = distributed.all_gather_object(capture_rng(), self.dist)
        sharded = None
        if self.cfg.fsdp:
            from . import fsdp

            sharded = fsdp.save_sharded(self.raw_model, self.optimizer, self.out_dir, self.step, self.dist)
            model_state = fsdp.full_model_state(self.raw_model)  # collective: rank 0 gets the full weights
        else:
            model_state = self.raw_model.state_dict()
        if not self.dist.is_main:
            return
        atomic_save(self._checkpoint_state(rng, model_state, sharded), self.ckpt_path)
        if sharded is not None:
            fsdp.remove_old_sharded(self.out_dir, keep=sharded)

    def _checkpoint_state(self, rng: list[dict], model_state: dict, sharded: str | None) -> dict:
        return {
            "format": FORMAT,
            "step": self.step,
            "tokens": self.tokens_seen,
            "model": model_state,
            "model_config": self.raw_model.config.to_dict(),
            "optimizer": self.optimizer.state_dict() if sharded is None else None,
            "sharded_state": sharded,  # --fsdp: the folder holding the sharded weights and optimizer state
            "grad_scaler": self.precision.scaler.state_dict(),  # {} unless fp16
            "schedule": dict(max_lr=self.cfg.lr, min_lr=self.cfg.min_lr, warmup_steps=self.cfg.warmup_steps,
                             max_steps=self.cfg.max_steps),
            "rng": rng,  # one entry per rank
            "loader": to_plain(self.loader.state_dict()),
            "loader_mode": self.loader_mode,
            "train_config": asdict(self.cfg),
            "tokenizer": self.tokenizer.name,  # what llm generate / eval use by default (an absolute path, or "gpt2")
            "data_meta": to_plain(dict(self.prepared.meta)),
            "initial_val_loss": self.initial_val_loss,
            "unigram_loss": self.unigram,
            "world_size": self.dist.world_size,
        }

    def _plot(self) -> None:
        if self.dist.is_main:
            plot_losses(self.metrics.records, self.out_dir / PLOT_NAME, yardstick=self.unigram)

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    def summary(self, sample: str | None) -> dict:
        seconds = self.loop_seconds
        run_tokens = len(self.losses) * self.tokens_per_step
        out = {
            "initial_val_loss": self.initial_val_loss,
            "final_val_loss": self.last_val_loss,
            "unigram_loss": self.unigram,
            "steps": self.step,
            "steps_this_run": len(self.losses),
            "tokens": self.tokens_seen,
            "seconds": seconds,
            "total_seconds": time.perf_counter() - self.t_start,
            "tokens_per_s": run_tokens / seconds if seconds > 0 else float("nan"),
            "losses": self.losses,
            "checkpoint": str(self.ckpt_path),
            "metrics": str(self.out_dir / METRICS_NAME),
            "plot": str(self.out_dir / PLOT_NAME),
            "sample": sample,
        }
        margin = self.unigram - out["final_val_loss"]
        self._print(f"val loss {out['initial_val_loss']:.4f} -> {out['final_val_loss']:.4f}, "
                    f"{abs(margin):.4f} nats {'below' if margin >= 0 else 'above'} the unigram yardstick {self.unigram:.4f}; "
                    f"{out['steps_this_run']} steps, {run_tokens:,} tokens in {seconds:.1f} s "
                    f"({out['tokens_per_s']:,.0f} tok/s); checkpoint {self.ckpt_path}")
        return out
