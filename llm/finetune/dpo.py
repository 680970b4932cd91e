"""Direct Preference Optimization (Rafailov et al. 2023) on chosen/rejected response pairs.

    from llm.finetune.dpo import DPOConfig, dpo
    summary = dpo(DPOConfig(checkpoint="out/sft/ckpt.pt"))
    # or: llm dpo --checkpoint out/sft/ckpt.pt [--beta 0.1] [--lora-rank 8]

The policy starts as the given model (normally an SFT checkpoint) and a frozen copy of it is the
reference.  For a prompt x with preferred answer y_c and dispreferred answer y_r, with
pi = log p_policy(y | x) and r = log p_reference(y | x) summed over the answer's tokens:

    loss = -log sigmoid( beta * ((pi_c - r_c) - (pi_r - r_r)) )

``beta * (pi - r)`` is the answer's implicit reward; the reward margin is chosen minus rejected and
the preference accuracy the share of pairs whose margin is positive.  Both start at exactly 0
(policy == reference) and grow as the policy learns the preferences.  The prompt and the response
header ("### Response:") are not scored, only the answer and its closing <|endoftext|>.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..train import train_setup
from .common import (FinetuneConfig, FinetuneRun, _opt, add_config_args, config_from_args, load_splits,
                     load_start_model, load_tokenizer, log, maybe_apply_lora, save_results)
from .instruct import EOT, IGNORE_INDEX, encode_parts
from ..scoring import sequence_logprobs

__all__ = ["DPOConfig", "dpo", "dpo_loss", "dpo_batch_loss", "collate_pairs", "PreferenceDataset",
           "evaluate_pairs", "add_dpo_args", "run_dpo", "PREFERENCE_KEYS"]

PREFERENCE_KEYS = ("instruction", "input", "chosen", "rejected")


@dataclass
class DPOConfig(FinetuneConfig):
    """Every knob of a DPO run; each field is also a ``llm dpo`` flag."""

    data: str = _opt("instruction-data-with-preference", "dataset name or JSON file with chosen/rejected")
    beta: float = _opt(0.1, "DPO temperature: how far the policy may move from the reference")
    lr: float = _opt(5e-6, "AdamW learning rate (constant; the book uses 5e-6)")
    out_dir: str = _opt("out/dpo", "folder for ckpt.pt, metrics.jsonl, loss.png, test_responses.json")

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


# ---------------------------------------------------------------------------------------------
# the objective


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over pairs from summed log-probs, all (B,); plus the batch's reward metrics."""
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError("dpo_loss takes four (B,) tensors of summed log-probs, "
                         f"got shapes {sorted(map(tuple, shapes))}")
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)  # (B,)
    margin = chosen_reward - rejected_reward  # (B,)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"reward_margin": margin.mean().item(), "chosen_reward": chosen_reward.mean().item(),
                 "rejected_reward": rejected_reward.mean().item(), "accuracy": (margin > 0).float().mean().item()}
    return loss, stats


def dpo_batch_loss(policy, reference, idx: torch.Tensor, targets: torch.Tensor, beta: float):
    """DPO loss of a batch from :func:`collate_pairs`: rows [0, B) chosen, [B, 2B) the rejected answers."""
    n = idx.shape[0] // 2
    with torch.no_grad():
        ref = sequence_logprobs(reference, idx, targets)  # (2B,)
    pol = sequence_logprobs(policy, idx, targets)  # (2B,)
    return dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)


@torch.no_grad()
def evaluate_pairs(policy, reference, loader, beta: float, device, autocast, max_batches: int | None = None) -> dict:
    """Loss and reward metrics averaged over (at most ``max_batches``) batches, weighted by pairs."""
    policy.eval()
    sums, pairs = {}, 0
    for i, (idx, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        idx, targets = idx.to(device), targets.to(device)
        with autocast():
            loss, stats = dpo_batch_loss(policy, reference, idx, targets, beta)
        n = idx.shape[0] // 2
        for k, v in {"loss": loss.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v * n
        pairs += n
    if pairs == 0:
        raise ValueError("no preference pairs to evaluate on")
    return {k: v / pairs for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------
# data


class PreferenceDataset(torch.utils.data.Dataset):
    """Item i is (prompt ids, chosen ids, rejected ids); the prompt ends with "### Response:\\n"
    and each answer with the tokenizer's end-of-text token, so the choice to stop is scored too."""

    def __init__(self, records, tokenizer):
        self.records = list(records)
        self.items = []
        eot = tokenizer.eot_token
        for rec in self.records:
            prompt, header, chosen = encode_parts(rec, tokenizer, "chosen")
            rejected = encode_parts(rec, tokenizer, "rejected")[2]
            self.items.append((prompt + header, chosen + [eot], rejected + [eot]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def keep_fitting(self, max_length: int) -> int:
        """Drop pairs whose prompt leaves no answer token within ``max_length``; returns how many."""
        # answer targets start at position len(prompt) - 1, so one survives iff len(prompt) <= max_length
        keep = [i for i, (p, _, _) in enumerate(self.items) if len(p) <= max_length]
        dropped = len(self.items) - len(keep)
        self.items = [self.items[i] for i in keep]
        self.records = [self.records[i] for i in keep]
        return dropped


def collate_pairs(batch, *, pad_token_id: int = EOT, ignore_index: int = IGNORE_INDEX,
                  allowed_max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets), both (2B, T): rows [0, B) are prompt + chosen, rows [B, 2B) prompt + rejected.

    targets are the inputs shifted by one, with ``ignore_index`` wherever the token predicted is a
    prompt token or padding, so ``sequence_logprobs`` sums exactly the answers' log-probabilities.
    """
    if not batch:
        raise ValueError("collate_pairs got an empty batch")
    rows = [(p, c) for p, c, _ in batch] + [(p, r) for p, _, r in batch]
    longest = max(len(p) + len(a) for p, a in rows)
    idx, targets = [], []
    for prompt, answer in rows:
        seq = list(prompt) + list(answer)
        pad = longest - len(seq)
        x = torch.tensor(seq[:-1] + [pad_token_id] * pad, dtype=torch.long)  # (longest - 1,)
        y = torch.tensor(seq[1:] + [ignore_index] * pad, dtype=torch.long)  # (longest - 1,)
        y[:len(prompt) - 1] = ignore_index  # target t is token t + 1: these predict prompt tokens
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        idx.append(x)
        targets.append(y)
    return torch.stack(idx), torch.stack(targets)  # (2B, T) each


# ---------------------------------------------------------------------------------------------
# the run


def dpo(cfg: DPOConfig) -> dict:
    """Run DPO as ``cfg`` says; returns a summary dict (first/final metrics, losses, paths)."""
    cfg.validate()
    train, val, test = load_splits(cfg, PREFERENCE_KEYS, "DPO", "pairs")
    with FinetuneRun(cfg, "dpo") as run, train_setup.kernels_backend(cfg.kernels):
        device, precision = run.device, run.precision
        autocast, compute_dtype = precision.autocast, precision.name
        policy, source = load_start_model(cfg)
        policy.to(device)
        # The reference is the starting model itself, frozen: a copy taken before LoRA wraps the policy.
        reference = copy.deepcopy(policy).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        maybe_apply_lora(policy, cfg)
        block = policy.config.block_size
        max_len = min(cfg.max_length or block, block)
        tokenizer = load_tokenizer(cfg, source, policy)
        datasets = {}
        for split, recs in (("train", train), ("val", val)):
            ds = PreferenceDataset(recs, tokenizer)
            dropped = ds.keep_fitting(max_len)
            if dropped:
                log(f"{split}: dropped {dropped} pairs whose prompt is longer than {max_len} tokens")
            datasets[split] = ds
        collate_fn = partial(collate_pairs, pad_token_id=tokenizer.eot_token, allowed_max_length=max_len)
        eval_loaders = {s: DataLoader(ds, cfg.batch_size, shuffle=False, collate_fn=collate_fn)
                        for s, ds in datasets.items()}
        train_ds = datasets["train"]
        steps_per_epoch, total = run.schedule(len(train_ds))
        log(f"DPO: {len(train_ds)} train, {len(datasets['val'])} val pairs, {len(test)} test records; "
            f"beta {cfg.beta}; {steps_per_epoch} steps of {cfg.batch_size} x {cfg.grad_accum_steps} x "
            f"{run.dist.world_size} pairs per epoch, {total} steps; sequences up to {max_len} tokens; "
            f"{device} {compute_dtype}; from {source}")

        def step_loss(net, batch):
            idx, targets = batch[0].to(device), batch[1].to(device)
            loss, stats = dpo_batch_loss(net, reference, idx, targets, cfg.beta)
            return loss, {**stats, "tokens": idx.numel(), "seq_len": idx.shape[1]}

        def evaluate():
            out = {}
            for split, loader in eval_loaders.items():
                stats = evaluate_pairs(policy, reference, loader, cfg.beta, device, autocast, cfg.eval_iters)
                out.update({f"{split}_{k}": v for k, v in stats.items()})
            return out

        run.start(policy)
        result = run.train(policy, len(train_ds), lambda idx: collate_fn([train_ds[i] for i in idx]), step_loss,
                           evaluate, desc="dpo")
        first, final = result["first_eval"], result["final_eval"]
        saved, responses = save_results(run, policy, "dpo", {"source": source, "step": result["steps"],
                                                              "initial_eval": first, "final_eval": final}, test, tokenizer)
    log(f"val reward margin {first['val_reward_margin']:.4f} -> {final['val_reward_margin']:.4f}, "
        f"accuracy {first['val_accuracy']:.2f} -> {final['val_accuracy']:.2f} in {result['steps']} steps "
        f"({result['seconds']:.1f} s); saved {saved}" + (f"; test responses {responses}" if responses else ""))
    return {"initial": first, "final": final, "losses": result["losses"], "steps": result["steps"],
            "seconds": result["seconds"], "checkpoint": str(saved),
            "test_responses": str(responses) if responses else None,
            "n_train": len(train_ds), "n_val": len(datasets["val"]), "n_test": len(test)}


# ---------------------------------------------------------------------------------------------
# CLI (wired into llm/cli.py's COMMANDS as "dpo")


def add_dpo_args(p: argparse.ArgumentParser) -> None:
    """One flag per DPOConfig field (``--beta``, ``--checkpoint``, ``--lora-rank`` ...)."""
    add_config_args(p, DPOConfig)


def run_dpo(args: argparse.Namespace) -> int:
    dpo(config_from_args(DPOConfig, args, "dpo"))
    return 0
