"""Supervised instruction fine-tuning (the book's chapter 7), full or with LoRA.

    from llm.finetune.sft import SFTConfig, sft
    summary = sft(SFTConfig(hf_model="gpt2-medium-dir", epochs=2))
    # or: llm sft --hf-model DIR [--mask-prompt] [--lora-rank 16]

The Alpaca-formatted records (``llm/finetune/instruct.py``) are split 85/10/5 into train/test/val; each batch
is padded and shifted by ``instruct.collate`` and the loss is the model's own (the fused
``kernels.linear_cross_entropy``, which skips the ``-100`` targets).  After training the run writes
``ckpt.pt`` (pretraining's format: ``llm generate --checkpoint`` reads it), ``metrics.jsonl``,
``loss.png`` and ``test_responses.json``: the test records with the model's greedy answers.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader

from ..train import train_setup
from .common import (FinetuneConfig, FinetuneRun, _opt, add_config_args, config_from_args, load_splits,
                     load_start_model, load_tokenizer, log, maybe_apply_lora, save_results)
from .instruct import IGNORE_INDEX, INSTRUCTION_KEYS, InstructionDataset, collate

__all__ = ["SFTConfig", "sft", "evaluate_loss", "add_sft_args", "run_sft"]


@dataclass
class SFTConfig(FinetuneConfig):
    """Every knob of an SFT run; each field is also a ``llm sft`` flag."""

    epochs: int = _opt(2, "passes over the training split (the book trains 2)")
    mask_prompt: bool = _opt(False, "learn only the response: prompt (instruction + input) targets are ignored")
    out_dir: str = _opt("out/sft", "folder for ckpt.pt, metrics.jsonl, loss.png, test_responses.json")


@torch.no_grad()
def evaluate_loss(model, loader, device, autocast, max_batches: int | None = None) -> float:
    """Mean cross-entropy per target token over (at most ``max_batches``) batches of ``loader``.

    Weighted by the number of non-ignored targets, so a batch of short answers does not count
    as much as one of long answers (the mean of batch means would).
    """
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        n = int((y != IGNORE_INDEX).sum())
        if n == 0:
            continue
        with autocast():
            _, loss = model(x, y)
        total, count = total + loss.float().item() * n, count + n
    if count == 0:
        raise ValueError("no target tokens to evaluate on (every target is masked)")
    return total / count


def _keep_learnable(ds: InstructionDataset, max_len: int, mask_prompt: bool, split: str) -> InstructionDataset:
    """With --mask-prompt, a record whose prompt fills the whole window has no target left: drop it."""
    if not mask_prompt:
        return ds
    # Response targets start at position prompt_len - 1, so one survives truncation iff prompt_len <= max_len.
    keep = [i for i, (_, prompt_len) in enumerate(ds.items) if prompt_len <= max_len]
    if len(keep) < len(ds):
        log(f"{split}: dropped {len(ds) - len(keep)} of {len(ds)} records whose prompt is longer than "
            f"{max_len} tokens (nothing would be learned from them); raise --max-length/--block-size to keep them")
    ds.items = [ds.items[i] for i in keep]
    ds.records = [ds.records[i] for i in keep]
    return ds


def sft(cfg: SFTConfig) -> dict:
    """Run supervised fine-tuning as ``cfg`` says; returns a summary dict (losses, paths, counts)."""
    cfg.validate()
    train, val, test = load_splits(cfg, INSTRUCTION_KEYS, "SFT", "records")
    with FinetuneRun(cfg, "sft") as run, train_setup.kernels_backend(cfg.kernels):
        device, precision = run.device, run.precision
        autocast, compute_dtype = precision.autocast, precision.name
        model, source = load_start_model(cfg)
        model.to(device)
        maybe_apply_lora(model, cfg)
        block = model.config.block_size
        max_len = min(cfg.max_length or block, block)
        tokenizer = load_tokenizer(cfg, source, model)
        train_ds = _keep_learnable(InstructionDataset(train, tokenizer), max_len, cfg.mask_prompt, "train")
        val_ds = _keep_learnable(InstructionDataset(val, tokenizer), max_len, cfg.mask_prompt, "val")
        collate_fn = partial(collate, pad_token_id=tokenizer.eot_token, allowed_max_length=max_len,
                             mask_prompt=cfg.mask_prompt)
        # evaluation always scores the same first batches, in file order
        train_eval = DataLoader(train_ds, cfg.batch_size, shuffle=False, collate_fn=collate_fn)
        val_eval = DataLoader(val_ds, cfg.batch_size, shuffle=False, collate_fn=collate_fn)
        # full batches only, as the book's drop_last; the order is reshuffled each epoch (llm/finetune/loop.py)
        steps_per_epoch, total = run.schedule(len(train_ds))
        log(f"SFT: {len(train_ds)} train, {len(val_ds)} val, {len(test)} test records; {steps_per_epoch} steps "
            f"of {cfg.batch_size} x {cfg.grad_accum_steps} x {run.dist.world_size} records per epoch, {total} steps; "
            f"sequences up to {max_len} tokens; {device} {compute_dtype}; mask_prompt={cfg.mask_prompt}; from {source}")

        def step_loss(net, batch):
            x, y = batch[0].to(device), batch[1].to(device)
            _, loss = net(x, y)
            return loss, {"targets": int((y != IGNORE_INDEX).sum()), "tokens": x.numel(), "seq_len": x.shape[1]}

        def evaluate():
            return {"train_loss": evaluate_loss(model, train_eval, device, autocast, cfg.eval_iters),
                    "val_loss": evaluate_loss(model, val_eval, device, autocast, cfg.eval_iters)}

        run.start(model)
        result = run.train(model, len(train_ds), lambda idx: collate_fn([train_ds[i] for i in idx]), step_loss,
                           evaluate, desc="sft")
        first, final = result["first_eval"]["val_loss"], result["final_eval"]["val_loss"]
        saved, responses = save_results(run, model, "sft", {"source": source, "step": result["steps"],
                                                             "initial_val_loss": first, "final_val_loss": final},
                                        test, tokenizer)
    log(f"val loss {first:.4f} -> {final:.4f} in {result['steps']} steps ({result['seconds']:.1f} s); saved {saved}"
        + (f"; test responses {responses}" if responses else ""))
    return {"initial_val_loss": first, "final_val_loss": final, "losses": result["losses"], "steps": result["steps"],
            "epochs": result["epochs"], "seconds": result["seconds"], "checkpoint": str(saved),
            "test_responses": str(responses) if responses else None, "n_train": len(train_ds), "n_val": len(val_ds),
            "n_test": len(test)}


# ---------------------------------------------------------------------------------------------
# CLI (wired into llm/cli.py's COMMANDS as "sft")


def add_sft_args(p: argparse.ArgumentParser) -> None:
    """One flag per SFTConfig field (``--lora-rank 8``, ``--mask-prompt``, ``--no-merge-lora`` ...)."""
    add_config_args(p, SFTConfig)


def run_sft(args: argparse.Namespace) -> int:
    sft(config_from_args(SFTConfig, args, "sft"))
    return 0
