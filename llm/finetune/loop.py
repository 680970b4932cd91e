"""The training loop of ``llm sft``, ``llm dpo`` and ``llm classify``, on par with ``llm pretrain``.

    with FinetuneRun(cfg, kind="sft") as run:           # device, precision, torchrun, lock, --resume
        model = ...; model.to(run.device)
        run.start(model)                                # a fresh out_dir, or the saved weights back
        result = run.train(model, len(train_set), make_batch, step_loss, evaluate, desc="sft")
        if run.is_main: ...save the result...
        run.done()                                      # the run finished: drop its resume state

What it shares with pretraining: AdamW (decay on matrices only), a warmup + cosine schedule that is a
function of the step alone (``llm.train.optim.lr_at``; the defaults, no warmup and ``min_lr = lr``, are the
book's constant rate), gradient accumulation, clipping, bf16/fp16 autocast with loss scaling,
``--compile``, data parallelism under ``torchrun`` (DistributedDataParallel; each rank takes its own
micro-batches of every step), and atomic resume checkpoints.

Exact resume: the order of the training items is ``randperm(n, seed + epoch)``, so the batches of a
step follow from the step number alone; ``state.pt`` (written every ``--checkpoint-interval`` steps
and at the end of training) holds the weights being trained, the optimizer and loss-scaler state,
every rank's RNG states and the evaluations so far.  ``--resume`` continues from it: the steps after
it are bitwise those of an uninterrupted run on a CPU.  A finished run removes ``state.pt``; its
result is ``ckpt.pt``.

Global micro-batch m of step s (1-based, ``steps_per_epoch`` steps an epoch, W ranks, A accumulation
steps) is taken by rank ``m % W``: items ``order[(k*W*A + a*W + r) * B : ... + B]`` with ``k`` the
step within its epoch.  One process with A = 2 therefore sees exactly the micro-batches that two
ranks with A = 1 see, and the loss (the mean over them) is the same.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch

from tqdm.auto import tqdm

from ..train import distributed, flops, train_setup
from ..train.checkpoint import CheckpointError, RunLock, atomic_save, capture_rng, check_resume_settings, restore_rank_rng

STATE_NAME, STATE_FORMAT = "state.pt", "llm-finetune-state-v1"
# What a resumed run may change: how long it trains, how it evaluates and reports, and how it runs.
# Everything else decides the model, the data or the batches, and must stay as the run began.
CHANGEABLE_ON_RESUME = ("epochs", "max_steps", "lr", "min_lr", "warmup_steps", "grad_clip", "eval_interval",
                        "eval_iters", "max_new_tokens", "num_test_responses", "out_dir", "overwrite", "progress",
                        "device", "kernels", "compile", "activation_checkpointing", "checkpoint_interval",
                        "merge_lora", "logger", "wandb_project", "peak_tflops", "resume")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; training stopped before that step's update (state.pt, if any, is kept)."""


def log(msg: str) -> None:
    """Print on rank 0 only, without breaking the progress bar."""
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(msg)


def load_state(out_dir: Path, kind: str) -> dict:
    path = out_dir / STATE_NAME
    if not path.is_file():
        done = (out_dir / "ckpt.pt").is_file() or (out_dir / "lora.pt").is_file()
        raise CheckpointError(f"cannot resume: no {path}" + (" (that run finished: its result is in the folder; "
                              "start a new run with --overwrite or another --out-dir)" if done else
                              " (no run was checkpointed there yet)"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a fine-tuning resume state of this package (format {STATE_FORMAT!r})")
    if state["kind"] != kind:
        raise CheckpointError(f"{path} is the state of an `llm {state['kind']}` run, not of `llm {kind}`")
    return state


def resumed_config(cls: type, out_dir: str | os.PathLike, kind: str, typed: dict):
    """The config of ``--resume``: the saved run's settings with the flags typed now on top."""
    saved = load_state(Path(out_dir), kind)["finetune_config"]
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in saved.items() if k in names}, **typed, "resume": True, "overwrite": False})


def check_same_run(saved: dict, cfg, saved_world: int, world: int) -> None:
    """ValueError naming the flag when a setting outside :data:`CHANGEABLE_ON_RESUME` differs."""
    check_resume_settings(saved, asdict(cfg), lambda name: name not in CHANGEABLE_ON_RESUME, saved_world, world)


class FinetuneRun:
    """One fine-tuning run: see the module docstring.  ``with`` holds the out_dir's lock and the
    process group and closes the metrics sinks however the block ends."""

    def __init__(self, cfg, kind: str):
        cfg.validate()
        self.cfg, self.kind, self.out_dir = cfg, kind, Path(cfg.out_dir)
        device = train_setup.resolve_device(cfg.device)
        self.dist = distributed.setup(device.type)
        if self.dist.enabled and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        if self.dist.enabled and device.type == "cpu":
            train_setup.set_cpu_threads()  # ranks share the cores
        self.device, self.is_main = device, self.dist.is_main
        train_setup.seed_everything(cfg.seed)
        self.precision = train_setup.choose_precision(device, cfg.dtype)
        self.state: dict | None = None
        self.metrics = None
        self._order: tuple[int | None, list[int]] = (None, [])  # (epoch, its shuffled item order)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "FinetuneRun":
        try:
            if self.is_main:
                self._stack.enter_context(RunLock(self.out_dir))
            if self.cfg.resume:
                self.state = load_state(self.out_dir, self.kind)
                check_same_run(self.state["finetune_config"], self.cfg, self.state["world_size"], self.dist.world_size)
            elif self.is_main:  # (other ranks could see files rank 0 has already started writing)
                from .common import prepare_out_dir

                prepare_out_dir(self.out_dir, self.cfg.overwrite, clear=False)  # fail fast, delete nothing yet
        except BaseException:
            self.__exit__(None, None, None)
            raise
        log(self.precision.describe())
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.metrics is not None:
                self.metrics.close()
            self._stack.close()
        finally:
            distributed.teardown(self.dist)

    # -- before training -------------------------------------------------------------------------

    def start(self, model: torch.nn.Module) -> None:
        """Call once the model is complete (LoRA, a classifier head): a fresh run clears the old outputs
        (only now, so a run that fails to start deletes nothing); a resumed one loads the saved weights."""
        from .common import METRICS_NAME, prepare_out_dir
        from ..train.tracking import make_sinks
        from ..train.train_log import MetricsLog

        if self.state is not None:
            model.load_state_dict(self.state["model"])
            log(f"resumed from {self.out_dir / STATE_NAME} at step {self.state['step']}")
        elif self.is_main:
            prepare_out_dir(self.out_dir, self.cfg.overwrite)
        resume_step = self.state["step"] if self.state is not None else None
        sinks = make_sinks(self.cfg.logger, self.out_dir, asdict(self.cfg), resume_step=resume_step,
                           wandb_project=self.cfg.wandb_project) if self.is_main else []
        self.metrics = MetricsLog(self.out_dir / METRICS_NAME, enabled=self.is_main, resume_step=resume_step,
                                  sinks=sinks)

    def schedule(self, n_items: int) -> tuple[int, int]:
        """(steps per epoch, total steps); ValueError when the split has no step's worth of items."""
        cfg, W = self.cfg, self.dist.world_size
        per_step = cfg.batch_size * cfg.grad_accum_steps * W
        steps_per_epoch = n_items // per_step
        if steps_per_epoch < 1:
            raise ValueError(f"the training split has {n_items} items, fewer than one step's batch_size x "
                             f"grad_accum_steps x world size = {cfg.batch_size} x {cfg.grad_accum_steps} x {W} = "
                             f"{per_step}: lower --batch-size or --grad-accum-steps, or add records")
        return steps_per_epoch, cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    def micro_batches(self, step: int, n_items: int, steps_per_epoch: int) -> list[list[int]]:
        """This rank's item indices for each accumulation micro-batch of ``step`` (1-based)."""
        cfg, W, r = self.cfg, self.dist.world_size, self.dist.rank
        epoch, k = divmod(step - 1, steps_per_epoch)
        if self._order[0] != epoch:  # drawn once an epoch, not every step
            gen = torch.Generator().manual_seed(cfg.seed + epoch)
            self._order = (epoch, torch.randperm(n_items, generator=gen).tolist())
        order = self._order[1]
        B, A = cfg.batch_size, cfg.grad_accum_steps
        return [order[(k * W * A + a * W + r) * B:(k * W * A + a * W + r + 1) * B] for a in range(A)]

    # -- the loop --------------------------------------------------------------------------------

    def train(self, model: torch.nn.Module, n_items: int, make_batch: Callable[[list[int]], object],
              step_loss: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]],
              evaluate: Callable[[], dict], desc: str) -> dict:
        """Train ``model``'s trainable parameters; returns first/last eval, this run's losses, steps, seconds.

        ``make_batch(indices)`` builds a micro-batch from item indices; ``step_loss(net, batch)`` returns
        its loss and extra numbers to log, among them ``tokens`` (positions the forward ran on) and
        ``seq_len`` (their length, for the FLOPs) -- ``net`` is the compiled / DDP-wrapped model, which
        the forward must go through; ``evaluate()`` returns a dict of metrics (on the plain model).
        """
        from ..train.optim import configure_optimizer, lr_at, set_lr

        cfg, dist, precision = self.cfg, self.dist, self.precision
        steps_per_epoch, total = self.schedule(n_items)
        model.activation_checkpointing = cfg.activation_checkpointing
        optimizer = configure_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                        device_type=self.device.type)
        params = [p for p in model.parameters() if p.requires_grad]
        net = torch.compile(model) if cfg.compile else model
        if dist.enabled:
            ids = [dist.local_rank] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        peak = cfg.peak_tflops or flops.peak_tflops(self.device)
        min_lr = cfg.lr if cfg.min_lr is None else cfg.min_lr
        state = self.state
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if precision.scaler.is_enabled() and state.get("grad_scaler"):
                precision.scaler.load_state_dict(state["grad_scaler"])
            step, tokens, first, last = state["step"], state["tokens"], state["first_eval"], state["last_eval"]
            restore_rank_rng(state["rng"], dist.rank, dist.world_size, cfg.seed, step)
        else:
            step, tokens = 0, 0
            if dist.rank > 0:
                torch.manual_seed(cfg.seed + dist.rank)  # rank 0 matches a 1-process run
            first = last = evaluate()
            self.metrics.log(step=0, **first)
            log("step 0: " + _fmt(first))
        losses, t0 = [], time.perf_counter()
        bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        try:
            while step < total:
                step += 1
                t_step = time.perf_counter()
                lr = lr_at(step, max_lr=cfg.lr, min_lr=min_lr, warmup_steps=cfg.warmup_steps, max_steps=total)
                set_lr(optimizer, lr)
                model.train()
                loss_sum, extras = torch.zeros((), device=self.device), []
                micro = self.micro_batches(step, n_items, steps_per_epoch)
                for a, indices in enumerate(micro):
                    # DDP syncs gradients in backward: only on the last micro-batch of the step
                    sync = net.no_sync() if dist.enabled and a < len(micro) - 1 else contextlib.nullcontext()
                    with sync:
                        with precision.autocast():
                            loss, extra = step_loss(net, make_batch(indices))
                        loss = loss / len(micro)
                        precision.backward(loss)  # fp16: the loss times the scale
                    loss_sum += loss.detach()
                    extras.append(extra)
                value = distributed.all_reduce_mean(loss_sum, dist).item()
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"non-finite loss ({value}) at step {step}; try a lower --lr"
                                        + (", then --resume" if (self.out_dir / STATE_NAME).exists() else ""))
                # unscale (fp16), clip, step -- or skip the step when fp16 gradients overflowed
                grad_norm, skipped = precision.step(optimizer, params, cfg.grad_clip)
                optimizer.zero_grad(set_to_none=True)
                extra = _merge(extras)
                positions, seq_len = extra.pop("tokens", 0) * dist.world_size, extra.pop("seq_len", 1)
                tokens += positions
                dt = time.perf_counter() - t_step
                record = dict(step=step, loss=value, lr=lr, grad_norm=grad_norm, epoch=(step - 1) // steps_per_epoch,
                              tokens=tokens, tok_per_s=positions / dt, dt_ms=1000 * dt)
                record.update(flops.step_performance(positions / dt / dist.world_size,
                                               flops.flops_per_token(model, seq_len), peak, self.device))
                record.update(extra)
                record.update(precision.metrics(skipped))
                losses.append(value)
                self.metrics.log(**record)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                bar.update(1)
                if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == total:
                    last = evaluate()
                    self.metrics.log(step=step, **last)
                    log(f"step {step} (epoch {record['epoch'] + 1}): batch loss {value:.4f}, " + _fmt(last))
                if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == total:
                    self._save_state(model, optimizer, step, tokens, first, last)
        finally:
            bar.close()
        return {"first_eval": first, "final_eval": last, "losses": losses, "steps": step,
                "epochs": math.ceil(step / steps_per_epoch), "seconds": time.perf_counter() - t0}

    def _save_state(self, model, optimizer, step: int, tokens: int, first: dict, last: dict) -> None:
        rng = distributed.all_gather_object(capture_rng(), self.dist)  # every rank takes part
        if not self.is_main:
            return
        atomic_save({"format": STATE_FORMAT, "kind": self.kind, "step": step, "tokens": tokens,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "grad_scaler": self.precision.scaler.state_dict(), "rng": rng, "first_eval": first,
                     "last_eval": last, "finetune_config": asdict(self.cfg), "world_size": self.dist.world_size},
                    self.out_dir / STATE_NAME)

    def done(self) -> None:
        """The run's results are written: its resume state is no longer needed."""
        if self.is_main:
            (self.out_dir / STATE_NAME).unlink(missing_ok=True)


def _merge(extras: list[dict]) -> dict:
    """One step's extra numbers from its micro-batches: counts (ints) summed, the rest averaged."""
    out: dict = {}
    for key in extras[0] if extras else ():
        values = [e[key] for e in extras if key in e]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = max(values) if key == "seq_len" else sum(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
