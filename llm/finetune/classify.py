"""Fine-tuning a GPT for text classification (the book's chapter 6: SMS spam).

    llm classify --hf-model gpt2-dir                      # the book: 747+747 SMS, last block + head trained
    llm classify --preset tiny --trainable all --epochs 3
    llm classify --predict "You won a prize!" --checkpoint out/classify/ckpt.pt

The LM head is replaced by a ``num_classes`` Linear (its own weight, not the embedding's) and the
output at the LAST REAL token of each row is classified.  The book takes the final position,
which with right padding is a pad token for every message shorter than the longest; the last
real token is what a causal model has read the whole message at, and is what Hugging Face's
GPT2ForSequenceClassification does.  Outputs in --out-dir: ckpt.pt (kind "classify"),
metrics.jsonl, loss.png, accuracy.png.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..train import train_setup
from .classify_data import balance, encode_batch, label_names, load_labelled, split
from .common import (FinetuneConfig, FinetuneRun, _opt, add_config_args, config_from_args, finish_and_save,
                     load_start_model, load_tokenizer, log)
from .lora import describe_trainable

__all__ = ["ClassifyConfig", "classify", "make_classifier", "set_trainable", "class_logits", "predict",
           "add_classify_args", "run_classify"]
TRAINABLE = ("last-block", "all", "head")
PAD_ID = 50256  # <|endoftext|>, the book's pad token


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Every knob of a classification run; each field is also a ``llm classify`` flag."""

    data: str = _opt("sms-spam", "dataset name (sms-spam) or a .tsv/.csv/.jsonl file with a text and a label column")
    text_column: str = _opt("text", "the text column of --data")
    label_column: str = _opt("label", "the label column of --data")
    balance: bool = _opt(True, "undersample every class to the smallest (the book: 747 ham, 747 spam)")
    split_seed: int | None = _opt(123, "seed of the balancing and of the shuffle before the 70/10/20 split")
    trainable: str = _opt("last-block", "what trains: last-block (the book: last block + final norm + head), "
                                        "all, or head")
    epochs: int = _opt(5, "passes over the training split (the book trains 5)")
    eval_iters: int = _opt(5, "batches per split per evaluation during training (the end scores whole splits)")
    out_dir: str = _opt("out/classify", "folder for ckpt.pt, metrics.jsonl, loss.png, accuracy.png")

    def validate(self) -> None:
        super().validate()
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        if self.lora_rank:
            raise ValueError("llm classify does not take --lora-rank; use --trainable")


def make_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the LM head by a fresh ``num_classes`` Linear (untied from the embedding)."""
    model.lm_head = nn.Linear(model.config.n_embd, num_classes).to(model.transformer.wte.weight.device)
    return model


def set_trainable(model: nn.Module, which: str) -> None:
    """Freeze everything, then unfreeze the head (+ final norm and last block for last-block; all for all)."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}; got {which!r}")
    for p in model.parameters():
        p.requires_grad = which == "all"
    parts = [model.lm_head] + ([model.transformer.h[-1], model.transformer.ln_f] if which == "last-block" else [])
    for m in parts:
        for p in m.parameters():
            p.requires_grad = True


def class_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, num_classes): the head's output at each row's last real token (position length - 1)."""
    logits, _ = model(ids)  # (B, T, K)
    return logits[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1].float()


@torch.no_grad()
def evaluate(model, records, names, tokenizer, max_len, batch_size, device, autocast, max_batches=None) -> dict:
    """Accuracy and mean cross-entropy over (at most ``max_batches`` batches of) ``records``."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    index = {n: i for i, n in enumerate(names)}
    for b, start in enumerate(range(0, len(records), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        chunk = records[start:start + batch_size]
        ids, lengths = encode_batch([t for t, _ in chunk], tokenizer, max_len, PAD_ID)
        y = torch.tensor([index[lab] for _, lab in chunk], device=device)
        with autocast():
            logits = class_logits(model, ids.to(device), lengths)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        total += len(chunk)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


def classify(cfg: ClassifyConfig) -> dict:
    """Train a classifier as ``cfg`` says; returns accuracies per split, the checkpoint path and counts."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    records = load_labelled(cfg.data, cfg.text_column, cfg.label_column)[:cfg.limit]
    names = label_names(records)
    if len(names) < 2:
        raise ValueError(f"the first {cfg.limit} records have a single label {names}; raise --limit")
    seed = cfg.split_seed if cfg.split_seed is not None else cfg.seed
    if cfg.balance:
        records = balance(records, seed)
    train, val, test = split(records, seed)
    with FinetuneRun(cfg, "classify") as run, train_setup.kernels_backend(cfg.kernels):
        device, precision = run.device, run.precision
        model, source = load_start_model(cfg)
        tokenizer = load_tokenizer(cfg, source, model)
        make_classifier(model, len(names)).to(device)
        set_trainable(model, cfg.trainable)
        log(describe_trainable(model) + f" (--trainable {cfg.trainable})")
        block = model.config.block_size
        max_len = min(cfg.max_length or block, block)
        index = {n: i for i, n in enumerate(names)}
        steps_per_epoch, total = run.schedule(len(train))  # full batches only (the book's drop_last)
        log(f"classify: {len(train)} train, {len(val)} val, {len(test)} test records; labels {names}; "
            f"{steps_per_epoch} steps of {cfg.batch_size} x {cfg.grad_accum_steps} x {run.dist.world_size} records "
            f"per epoch, {total} steps; up to {max_len} tokens; {device} {precision.name}; from {source}")

        def step_loss(net, batch):
            ids, lengths = encode_batch([t for t, _ in batch], tokenizer, max_len, PAD_ID)
            y = torch.tensor([index[lab] for _, lab in batch], device=device)
            logits = class_logits(net, ids.to(device), lengths)
            return F.cross_entropy(logits, y), {"batch_accuracy": float((logits.argmax(-1) == y).float().mean()),
                                                "tokens": ids.numel(), "seq_len": ids.shape[1]}

        def scores(max_batches):
            out = {}
            for name, recs in (("train", train), ("val", val), ("test", test)):
                r = evaluate(model, recs, names, tokenizer, max_len, cfg.batch_size, device, precision.autocast,
                             max_batches)
                out[f"{name}_loss"], out[f"{name}_accuracy"] = r["loss"], r["accuracy"]
            return out

        run.start(model)
        result = run.train(model, len(train), lambda idx: [train[i] for i in idx], step_loss,
                           lambda: scores(cfg.eval_iters), desc="classify")
        final = scores(None)
        run.metrics.log(step=result["steps"], final=True, **final)
        saved = None
        if run.is_main:
            saved = finish_and_save(model, cfg, out_dir, "classify", {
                "source": source, "step": result["steps"], "num_classes": len(names), "labels": names,
                "tokenizer": tokenizer.name, "max_length": max_len, **final})
            plot_classify(run.metrics.records, out_dir)
        run.done()
    majority = max(sum(lab == n for _, lab in test) for n in names) / max(len(test), 1)
    log(f"test accuracy {final['test_accuracy']:.4f} (majority class {majority:.4f}), val "
        f"{final['val_accuracy']:.4f}, train {final['train_accuracy']:.4f}; {result['steps']} steps "
        f"({result['seconds']:.1f} s); saved {saved}")
    return {**final, "majority_accuracy": majority, "steps": result["steps"], "checkpoint": str(saved),
            "labels": names, "n_train": len(train), "n_val": len(val), "n_test": len(test), "losses": result["losses"]}


def plot_classify(records: list[dict], out_dir: Path) -> None:
    """loss.png (train loss per step, split losses per eval) and accuracy.png (split accuracies per eval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "val_accuracy" in r]
    for what, fname in (("loss", "loss.png"), ("accuracy", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if what == "loss":
            steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
            if steps:
                ax.plot(*zip(*steps), lw=1, alpha=0.6, label="batch loss")
        for split_name in ("train", "val", "test"):
            pts = [(r["step"], r[f"{split_name}_{what}"]) for r in evals]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{split_name} {what}")
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        plt.close(fig)


def load_classifier(path: str | Path, device="cpu"):
    """(model in eval mode, checkpoint dict) of a ``llm classify`` ckpt.pt."""
    from ..train.checkpoint import load_checkpoint
    from ..model import GPT, GPTConfig

    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "classify":
        raise ValueError(f"{path} is a {ckpt.get('kind', 'pretrain')!r} checkpoint, not one of llm classify")
    model = make_classifier(GPT(GPTConfig.from_dict(ckpt["model_config"])), ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


@torch.no_grad()
def predict(model, ckpt: dict, texts: list[str], tokenizer) -> list[dict]:
    """For each text: {"text", "label", "probabilities": {label: p}}."""
    out = []
    for text in texts:
        ids, lengths = encode_batch([text], tokenizer, ckpt["max_length"], PAD_ID)
        dev = model.transformer.wte.weight.device
        probs = torch.softmax(class_logits(model, ids.to(dev), lengths)[0], -1).tolist()
        names = ckpt["labels"]
        out.append({"text": text, "label": names[max(range(len(probs)), key=probs.__getitem__)],
                    "probabilities": dict(zip(names, probs))})
    return out


# ---------------------------------------------------------------------------------------------
# CLI (wired into llm/cli.py's COMMANDS as "classify")


def add_classify_args(p: argparse.ArgumentParser) -> None:
    """One flag per ClassifyConfig field, plus ``--predict TEXT`` (repeatable) with --checkpoint."""
    add_config_args(p, ClassifyConfig)
    p.add_argument("--predict", action="append", default=None, metavar="TEXT",
                   help="classify TEXT with the --checkpoint of a classify run (repeatable) instead of training")


def run_classify(args: argparse.Namespace) -> int:
    if args.predict:
        from ..tokenizer import get_tokenizer

        checkpoint, tokenizer = getattr(args, "checkpoint", None), getattr(args, "tokenizer", None)
        if not checkpoint:
            raise ValueError("--predict needs --checkpoint PATH of an llm classify run")
        model, ckpt = load_classifier(checkpoint)
        tokenizer = get_tokenizer(tokenizer or ckpt.get("tokenizer", "gpt2"))
        for r in predict(model, ckpt, args.predict, tokenizer):
            probs = ", ".join(f"{k} {v:.4f}" for k, v in r["probabilities"].items())
            print(f"{r['label']}\t({probs})\t{r['text']}")
        return 0
    classify(config_from_args(ClassifyConfig, args, "classify"))
    return 0
