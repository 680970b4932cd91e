"""Multiple choice by log-likelihood, the way HellaSwag and MMLU are scored for base models.

An item is ``{"context": str, "choices": [str, ...], "label": int}``.  Each choice is appended to
the context *verbatim* (so choices carry their own leading space: " A", " she walks away") and
scored by the summed log-probability of its tokens given everything before them.  The prediction
is the choice with the highest score:

    acc       argmax of the summed log-probability
    acc_norm  argmax of the summed log-probability divided by the choice's length in characters,
              as lm-evaluation-harness's acc_norm does (a token count would favour choices that
              the tokenizer happens to split finely); it removes the bias against long answers.

The choices of one item form one batch, padded on the right (a causal model's earlier positions
never see the padding) with the padded targets ignored.  When context + choice is longer than the
model's block, the context is cut from the left.
"""
from __future__ import annotations

import csv
import os
import random
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..scoring import token_logprobs
from .common import read_jsonl

__all__ = ["evaluate_multiple_choice", "fewshot_context", "from_hellaswag", "from_mmlu", "load_items", "score_choices"]

LETTERS = "ABCD"


def _check_item(item: dict, where: str = "item") -> None:
    if not isinstance(item, dict) or not {"context", "choices", "label"} <= set(item):
        raise ValueError(f"{where}: expected {{context, choices, label}}, got {item!r:.200}")
    choices, label = item["choices"], item["label"]
    if not isinstance(item["context"], str):
        raise ValueError(f"{where}: context must be a string, got {type(item['context']).__name__}: {item['context']!r:.100}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings, got {choices!r:.200}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: label must be an int index into the {len(choices)} choices, got {label!r}")


@torch.no_grad()
def score_choices(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice's tokens after ``context`` (a list of floats)."""
    block = model.config.block_size
    ctx = tokenizer.encode(context) or [tokenizer.eot_token]  # an empty context conditions on <|endoftext|>
    rows, targets = [], []
    for choice in choices:
        cont = tokenizer.encode(choice)
        if not cont:
            raise ValueError(f"choice {choice!r} encodes to no tokens")
        if len(cont) > block:
            raise ValueError(f"choice {choice[:60]!r} is {len(cont)} tokens, longer than the model's block of {block}")
        ids = (ctx + cont)[-(block + 1):]  # cut the context from the left; the choice stays whole
        n_ctx = len(ids) - len(cont)  # >= 1, so the first choice token has something before it
        rows.append(ids[:-1])
        targets.append([-100] * (n_ctx - 1) + cont)  # predict only the choice's tokens
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    # Right padding: the padded positions come after every scored one and are ignored (-100).
    idx = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)  # (n, T)
    tgt = torch.tensor([t + [-100] * (width - len(t)) for t in targets], dtype=torch.long, device=device)  # (n, T)
    return token_logprobs(model, idx, tgt).sum(dim=-1).tolist()


def fewshot_context(items: list[dict], index: int, n_shot: int, seed: int = 1234) -> str:
    """``n_shot`` solved examples ("context answer\\n\\n" each) drawn from ``items`` without item
    ``index``, then the item's own context.  The draw is seeded per item: the same item gets the
    same examples whatever --limit is."""
    item = items[index]
    if n_shot <= 0:
        return item["context"]
    pool = [i for i in range(len(items)) if i != index]
    if n_shot > len(pool):
        raise ValueError(f"{n_shot}-shot needs {n_shot + 1} items, the file has {len(items)}")
    shots = random.Random(seed * 1_000_003 + index).sample(pool, n_shot)
    prefix = "".join(f"{items[i]['context']}{items[i]['choices'][items[i]['label']]}\n\n" for i in shots)
    return prefix + item["context"]


def evaluate_multiple_choice(
    model, tokenizer, items: list[dict], *, n_shot: int = 0, seed: int = 1234,
    limit: int | None = None, progress: bool = True,
) -> dict:
    """{"metrics": {acc, acc_norm, n}, "items": per-item scores and predictions}."""
    if not items:
        raise ValueError("no multiple-choice items to evaluate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    for i, item in enumerate(items):
        _check_item(item, f"item {i}")
    chosen = range(len(items) if limit is None else min(limit, len(items)))
    results, hits, hits_norm = [], 0, 0
    for i in tqdm(chosen, desc="multiple choice", unit="item", disable=not progress):
        item = items[i]
        scores = score_choices(model, tokenizer, fewshot_context(items, i, n_shot, seed), item["choices"])
        normed = [s / len(c) for s, c in zip(scores, item["choices"])]
        pred, pred_norm = _argmax(scores), _argmax(normed)
        hits += pred == item["label"]
        hits_norm += pred_norm == item["label"]
        results.append({"index": i, "label": item["label"], "pred": pred, "pred_norm": pred_norm,
                        "logprobs": scores})
    n = len(results)
    return {"metrics": {"acc": hits / n, "acc_norm": hits_norm / n, "n": n}, "items": results}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima


# ---------------------------------------------------------------------------------------------
# Converters from the benchmarks' own formats


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness's preprocessing: WikiHow's "[title]" markers become sentence breaks,
    # other bracketed markers go, double spaces shrink (and, unlike there, the ends are trimmed,
    # so that a marker at the start leaves no double space after the choice's own leading space).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def from_hellaswag(record: dict) -> dict:
    """A HellaSwag JSONL record (ctx or ctx_a + ctx_b, endings, label, activity_label) as an item.

    Context: "<activity_label>: <ctx_a> <Ctx_b>" as in lm-evaluation-harness; choices " <ending>".
    """
    where = f"HellaSwag record {record.get('ind', '?')}" if isinstance(record, dict) else "HellaSwag record"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {record!r:.200}")
    try:
        endings, label = record["endings"], record["label"]
        parts = [record["ctx_a"], record.get("ctx_b", "")] if "ctx_a" in record else [record["ctx"]]
    except KeyError as exc:
        raise ValueError(f"HellaSwag record without {exc.args[0]!r}: {record!r:.200}") from None
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{where}: ctx / ctx_a / ctx_b must be strings, got {parts!r:.200}")
    # a string here would be split into its letters, one "ending" each: refuse it instead
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: endings must be a list of strings, got {type(endings).__name__}: {endings!r:.200}")
    ctx = parts[0] + " " + parts[1].capitalize() if len(parts) == 2 else parts[0]
    if label in ("", None):
        raise ValueError(f"HellaSwag record {record.get('ind', '?')} has no label (the test split is unlabeled)")
    activity = record.get("activity_label")
    context = _hellaswag_clean(f"{activity}: {ctx}" if activity else ctx)
    return {"context": context, "choices": [" " + _hellaswag_clean(e) for e in endings], "label": int(label)}


def from_mmlu(row, subject: str | None = None) -> dict:
    """An MMLU question as an item: a CSV row (question, A, B, C, D, answer letter), or a dict with
    question/A/B/C/D/answer or question/choices/answer (letter or index, the Hugging Face layout).

    Context "Question: ...\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices " A" .. " D"; with a
    ``subject``, lm-evaluation-harness's one-line header comes first.
    """
    if isinstance(row, dict):
        if "choices" in row:
            question, options, answer = row.get("question"), list(row["choices"]), row.get("answer")
        else:
            question, options, answer = row.get("question"), [row.get(k) for k in LETTERS], row.get("answer")
        subject = subject or row.get("subject")
    else:
        if len(row) != 6:
            raise ValueError(f"an MMLU CSV row has 6 fields (question, A, B, C, D, answer), "
                             f"got {len(row)}: {row!r:.200}")
        question, *options, answer = row
    if question is None or len(options) != 4 or any(o is None for o in options):
        raise ValueError(f"MMLU row needs a question and 4 options: {row!r:.200}")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        label = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
        label = answer
    else:
        raise ValueError(f"MMLU answer must be a letter A-D or an index 0-3, got {answer!r}")
    lines = [f"Question: {str(question).strip()}"] + [f"{L}. {str(o).strip()}" for L, o in zip(LETTERS, options)]
    context = "\n".join(lines) + "\nAnswer:"
    if subject:
        topic = subject.replace("_", " ")
        context = f"The following are multiple choice questions (with answers) about {topic}.\n\n" + context
    return {"context": context, "choices": [" " + L for L in LETTERS], "label": label}


def load_items(path: str | os.PathLike, fmt: str = "auto") -> list[dict]:
    """Items from a file: ``mc`` JSONL (our format), ``hellaswag`` JSONL, or ``mmlu`` CSV (no header).

    ``auto`` picks mmlu for .csv files, hellaswag for JSONL records with "endings", else mc.
    """
    if fmt not in ("auto", "mc", "hellaswag", "mmlu"):
        raise ValueError(f"format must be auto, mc, hellaswag or mmlu, got {fmt!r}")
    path = Path(path)
    if fmt == "mmlu" or (fmt == "auto" and path.suffix == ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        # MMLU's per-subject files are named <subject>_test.csv; the subject goes into the header line.
        subject = re.sub(r"_(test|val|dev)$", "", path.stem) if path.suffix == ".csv" else None
        with open(path, newline="", encoding="utf-8") as f:
            return [from_mmlu(row, subject) for row in csv.reader(f) if row]
    records = read_jsonl(path)
    if fmt == "hellaswag" or (fmt == "auto" and records and "endings" in records[0]):
        return [from_hellaswag(r) for r in records]
    for i, r in enumerate(records):
        _check_item(r, f"{path}, record {i}")
    return records
