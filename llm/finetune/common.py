"""What supervised fine-tuning (``llm/finetune/sft.py``) and DPO (``llm/finetune/dpo.py``) share.

    FinetuneConfig                 the settings both have; each field is also a CLI flag
    add_config_args / config_from_args
    load_start_model(cfg)          a GPT from --checkpoint, --hf-model or --preset
    load_tokenizer(cfg, source, model)   --tokenizer, or the one the checkpoint was trained with
    maybe_apply_lora(model, cfg)   wrap with LoRA (rank > 0) and print the trainable share
    finish_and_save(...)           merge LoRA (or save the factors alone), write ckpt.pt atomically
    load_lora_checkpoint(...)      put saved LoRA factors back on their base model
    write_test_responses(...)      the model's greedy answers on the test split, as the book does

The training loop itself, with resume and torchrun, is ``llm/finetune/loop.py``.

Checkpoints use the pretraining format (``llm.train.checkpoint.FORMAT``, keys ``model`` and
``model_config``), so ``llm generate --checkpoint`` and ``llm.train.checkpoint.load_model`` read them;
``kind`` ("sft" / "dpo") and ``finetune_config`` say what made them.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from tqdm.auto import tqdm

from kernels import BACKENDS

from ..train import train_setup
from ..train.checkpoint import FORMAT, atomic_save, atomic_write_text, load_checkpoint
from .loop import STATE_NAME, FinetuneRun, log, resumed_config
from .lora import apply_lora, describe_trainable, lora_state_dict, merge_lora
from ..model import GPT, PRESETS, GPTConfig
from ..tokenizer import checkpoint_tokenizer
from ..train.tracking import TENSORBOARD_DIR, WANDB_ID_FILE, TrackingConfig

CKPT_NAME, LORA_NAME, METRICS_NAME, PLOT_NAME, RESPONSES_NAME = (
    "ckpt.pt", "lora.pt", "metrics.jsonl", "loss.png", "test_responses.json")
LORA_FORMAT = "llm-lora-v1"
CHOICES = {"preset": tuple(PRESETS), "dtype": train_setup.DTYPES,
           "kernels": BACKENDS}


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig(TrackingConfig):
    # -- where the model comes from: exactly one of the three
    checkpoint: str | None = _opt(None, "start from this checkpoint (llm pretrain / sft output)")
    hf_model: str | None = _opt(None, "start from this Hugging Face GPT-2 folder")
    preset: str | None = _opt(None, "start from a randomly initialised preset (for tests)")
    block_size: int | None = _opt(None, "context length for --preset / --hf-model (None: the model's)")
    dropout: float | None = _opt(None, "dropout while fine-tuning (None: the model's own)")
    # -- data
    data: str = _opt("instruction-data", "dataset name or JSON file")
    tokenizer: str | None = _opt(None, "'gpt2' or the path of a Hugging Face tokenizer.json, or of a folder holding "
                                       "one (None: the one --checkpoint was trained with, or the --hf-model "
                                       "folder's tokenizer.json; else gpt2)")
    limit: int | None = _opt(None, "use only the first N records (quick runs)")
    split_seed: int | None = _opt(None, "shuffle with this seed before the 85/10/5 split (None: file order)")
    max_length: int | None = _opt(None, "truncate every sequence to this many tokens (None: the model's block_size)")
    # -- optimisation
    epochs: int = _opt(1, "passes over the training split")
    max_steps: int | None = _opt(None, "train exactly this many steps instead of --epochs epochs")
    batch_size: int = _opt(8, "records per micro-batch per process")
    grad_accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step")
    lr: float = _opt(5e-5, "peak AdamW learning rate")
    min_lr: float | None = _opt(None, "learning rate at the end of the cosine decay (None: --lr, a constant rate "
                                      "after the warmup, as the book trains)")
    warmup_steps: int = _opt(0, "steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay (2-D weights only)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0 disables)")
    # -- LoRA
    lora_rank: int = _opt(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float = _opt(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_targets: str = _opt("c_attn,c_proj,c_fc", "comma-separated Linear names to wrap (lm_head unties the head)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA branch's input")
    merge_lora: bool = _opt(True, "fold LoRA into the weights and write ckpt.pt (--no-merge-lora: only lora.pt)")
    # -- evaluation and output
    eval_interval: int = _opt(50, "steps between evaluations (0: only before and after)")
    eval_iters: int = _opt(5, "batches per evaluation")
    max_new_tokens: int = _opt(256, "tokens per test-split response")
    num_test_responses: int | None = _opt(None, "answer only the first N test records (None: all, 0: none)")
    out_dir: str = _opt("out/finetune", "folder for ckpt.pt, metrics.jsonl, loss.png, test_responses.json")
    overwrite: bool = _opt(False, "replace the outputs of an earlier run in --out-dir")
    resume: bool = _opt(False, "continue the interrupted run in --out-dir from its state.pt, with its settings "
                               "(flags typed now override those that may change)")
    checkpoint_interval: int = _opt(100, "steps between resume checkpoints (state.pt; also written when "
                                         "training ends, removed once the run's results are saved; 0: only then)")
    progress: bool = _opt(True, "show progress bars")
    # -- system
    seed: int = _opt(123, "seed of the model init (presets), data order and dropout")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = _opt("auto", "auto (bf16 autocast on a GPU with bf16, else fp16 with loss scaling; fp32 on "
                              "CPU and MPS), float32, bfloat16 or float16 (autocast with a GradScaler)")
    kernels: str = _opt("auto", "kernels backend: auto, torch (reference), pytorch (PyTorch's own ops), triton or cuda")
    compile: bool = _opt(False, "torch.compile the model for training (batches vary in length: dynamic shapes)")
    activation_checkpointing: bool = _opt(False, "recompute each transformer block's activations in backward "
                                                 "instead of keeping them (less memory, ~1/3 more compute)")

    def validate(self) -> None:
        self.validate_tracking()
        given = [n for n in ("checkpoint", "hf_model", "preset") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one model to start from: --checkpoint PATH, --hf-model DIR or --preset NAME"
                             + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or start it over")
        for name in ("epochs", "batch_size", "grad_accum_steps", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "limit", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (or unset), got {self.max_length}")
        for name in ("eval_interval", "max_new_tokens", "lora_rank", "weight_decay", "grad_clip", "warmup_steps",
                     "checkpoint_interval"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_test_responses is not None and self.num_test_responses < 0:
            raise ValueError(f"num_test_responses must be >= 0, got {self.num_test_responses}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.checkpoint is not None and self.block_size is not None:
            raise ValueError("--block-size applies to --preset and --hf-model; a checkpoint keeps its own")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# ---------------------------------------------------------------------------------------------
# CLI: one flag per config field, so the two cannot drift apart (as llm pretrain does).  Untyped flags
# stay out of the namespace (default SUPPRESS), so that --resume knows which settings were asked for.


def add_config_args(p: argparse.ArgumentParser, cls: type) -> None:
    helps = cls.help()
    for f in fields(cls):
        kind = str(f.type)
        help_text = helps[f.name].replace("%", "%%") + f" (default: {str(f.default).replace('%', '%%')})"
        kw: dict = {"default": argparse.SUPPRESS, "dest": f.name, "help": help_text}
        if "bool" in kind:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = int if "int" in kind else float if "float" in kind else str
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
            else:
                kw["metavar"] = f.name.upper()
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(cls: type, args: argparse.Namespace, kind: str | None = None):
    """The config of the flags typed (defaults for the rest); with --resume, the interrupted run's
    settings (from its state.pt) with the typed flags on top."""
    typed = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if typed.get("resume") and kind is not None:
        return resumed_config(cls, typed.get("out_dir", cls.out_dir), kind, typed)
    return cls(**typed)


# ---------------------------------------------------------------------------------------------
# the model


def load_start_model(cfg: FinetuneConfig) -> tuple[GPT, dict]:
    """(model in train mode on the CPU, a description of where it came from)."""
    overrides = {"dropout": cfg.dropout} if cfg.dropout is not None else {}
    if cfg.checkpoint is not None:
        ckpt = load_checkpoint(cfg.checkpoint)
        model = GPT(GPTConfig.from_dict({**ckpt["model_config"], **overrides}))
        model.load_state_dict(ckpt["model"])
        source = {"checkpoint": str(cfg.checkpoint), "kind": ckpt.get("kind", "pretrain"),
                  "tokenizer": checkpoint_tokenizer(ckpt)}
    else:
        if cfg.block_size is not None:
            overrides["block_size"] = cfg.block_size
        if cfg.hf_model is not None:
            if not Path(cfg.hf_model).is_dir():
                raise FileNotFoundError(f"--hf-model {cfg.hf_model}: no such folder")
            model, source = GPT.from_pretrained(cfg.hf_model, **overrides), {"hf_model": str(cfg.hf_model)}
        else:
            torch.manual_seed(cfg.seed)  # the random init is part of the run's identity
            model, source = GPT(GPTConfig.from_preset(cfg.preset, **overrides)), {"preset": cfg.preset}
    return model.train(), source


def load_tokenizer(cfg: FinetuneConfig, source: dict, model: GPT):
    """--tokenizer, else the one the --checkpoint was trained with (``source["tokenizer"]``) or the --hf-model
    folder's tokenizer.json, else GPT-2's; ValueError when it makes ids the model's embedding does not have."""
    from ..tokenizer import check_vocab_fits, folder_tokenizer, get_tokenizer

    default = folder_tokenizer(cfg.hf_model) if cfg.hf_model is not None else source.get("tokenizer", "gpt2")
    tokenizer = get_tokenizer(cfg.tokenizer or default)
    check_vocab_fits(model.config.vocab_size, tokenizer)
    return tokenizer


def load_splits(cfg: FinetuneConfig, keys, command: str, unit: str) -> tuple[list, list, list]:
    """(train, val, test) records of ``cfg.data`` (llm/finetune/instruct.py's 85/10/5 split); ValueError
    when the training or validation split is empty."""
    from .instruct import load_records, split_records

    records = load_records(cfg.data, keys, cfg.limit)
    train, val, test = split_records(records, seed=cfg.split_seed)
    if not train or not val:
        raise ValueError(f"{len(records)} records give {len(train)} train and {len(val)} validation {unit}; "
                         f"{command} needs both (use at least 20 records)")
    return train, val, test


def maybe_apply_lora(model: GPT, cfg: FinetuneConfig) -> None:
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    log(describe_trainable(model))


def prepare_out_dir(out_dir: Path, overwrite: bool, clear: bool = True) -> None:
    """Refuse to mix two runs in one folder unless --overwrite, which removes the old outputs.

    Runs call it twice: first with ``clear=False`` (fail fast, before loading a model), then
    right before training writes its first file, so a run that fails to start deletes nothing.
    """
    ours = [out_dir / n for n in (CKPT_NAME, LORA_NAME, METRICS_NAME, PLOT_NAME, RESPONSES_NAME, STATE_NAME,
                                  "accuracy.png", WANDB_ID_FILE, TENSORBOARD_DIR)]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        resume = " --resume to continue it," if (out_dir / STATE_NAME).exists() else ""
        raise FileExistsError(f"{existing[0]} exists: pass{resume} --overwrite to replace that run, or another --out-dir")
    if clear:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# saving and test responses


def finish_and_save(model: GPT, cfg: FinetuneConfig, out_dir: Path, kind: str, extra: dict) -> Path:
    """Merge LoRA and write ckpt.pt (loadable by ``load_model``), or with --no-merge-lora write only
    the LoRA factors to lora.pt.  Returns the file written."""
    lora = cfg.lora_rank > 0
    state = {"format": FORMAT, "kind": kind, "finetune_config": asdict(cfg), **extra}
    if lora and not cfg.merge_lora:
        path = out_dir / LORA_NAME
        atomic_save({**state, "format": LORA_FORMAT, "lora": lora_state_dict(model),
                     "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": cfg.lora_targets,
                     "model_config": model.config.to_dict()}, path)
        return path
    if lora:
        merge_lora(model)
    path = out_dir / CKPT_NAME
    atomic_save({**state, "model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return path


def load_lora_checkpoint(model: GPT, path: str | Path) -> GPT:
    """Wrap ``model`` (the run's starting model) with the LoRA factors of a --no-merge-lora run's lora.pt."""
    from .lora import load_lora_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != LORA_FORMAT:
        raise ValueError(f"{path} is not a LoRA file of this package (format {LORA_FORMAT!r})")
    shape = lambda d: {k: v for k, v in d.items() if k != "dropout"}  # dropout may differ
    if shape(state["model_config"]) != shape(model.config.to_dict()):
        raise ValueError(f"{path} was trained on a model with config {state['model_config']}, "
                         f"this one has {model.config.to_dict()}")
    apply_lora(model, state["lora_rank"], state["lora_alpha"], state["lora_targets"])
    load_lora_state_dict(model, state["lora"])
    return model


@torch.no_grad()
def generate_responses(model: GPT, records: list[dict], tokenizer, max_new_tokens: int, device: torch.device,
                       autocast: Callable, progress: bool = True) -> list[dict]:
    """Each record plus ``model_response``: greedy decoding from the prompt, stopped at the end-of-text token."""
    from ..generate import generate
    from .instruct import prompt_ids

    model.eval()
    out = []
    for rec in tqdm(records, desc="test responses", unit="rec", dynamic_ncols=True, disable=not progress):
        ids, eot = prompt_ids(rec, tokenizer), tokenizer.eot_token
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        with autocast():
            seq = generate(model, idx, max_new_tokens, temperature=0.0, eos_token_id=eot)  # (1, T + n)
        new = seq[0, len(ids):].tolist()
        new = new[:new.index(eot)] if eot in new else new
        out.append({**rec, "model_response": tokenizer.decode(new).strip()})
    return out


def write_test_responses(model, test: list[dict], cfg: FinetuneConfig, out_dir: Path, device, autocast,
                         tokenizer=None) -> Path | None:
    from ..tokenizer import get_tokenizer

    n = len(test) if cfg.num_test_responses is None else min(cfg.num_test_responses, len(test))
    if n == 0 or cfg.max_new_tokens == 0:
        return None
    responses = generate_responses(model, test[:n], tokenizer or get_tokenizer(), cfg.max_new_tokens, device, autocast,
                                   cfg.progress)
    path = out_dir / RESPONSES_NAME
    atomic_write_text(path, json.dumps(responses, indent=2, ensure_ascii=False) + "\n")
    return path


def save_results(run: FinetuneRun, model: GPT, kind: str, extra: dict, test: list[dict], tokenizer):
    """Rank 0 writes ckpt.pt (or lora.pt), test_responses.json and loss.png; then the run's resume state
    goes.  Returns (the checkpoint written, the responses file), None on other ranks."""
    cfg, out_dir = run.cfg, Path(run.cfg.out_dir)
    saved = responses = None
    if run.is_main:
        saved = finish_and_save(model, cfg, out_dir, kind, {**extra, "tokenizer": tokenizer.name})
        responses = write_test_responses(model, test, cfg, out_dir, run.device, run.precision.autocast, tokenizer)
        plot(run.metrics, out_dir)
    run.done()
    return saved, responses


def plot(metrics, out_dir: Path) -> None:
    """loss.png: the training loss per step and ``val_loss`` per evaluation (llm pretrain's plot)."""
    from ..train.train_log import plot_losses

    plot_losses(metrics.records, out_dir / PLOT_NAME)
