"""Data for ``llm classify`` (the book's chapter 6): labelled texts, balanced, split and padded.

    records = load_labelled("sms-spam")              # [(text, label), ...]
    records = balance(records, seed=123)             # undersample every class to the smallest
    train, val, test = split(records, seed=123)      # 70 / 10 / 20
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

__all__ = ["load_labelled", "balance", "split", "label_names", "encode_batch"]


def load_labelled(data: str, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from a registry name ("sms-spam") or a .tsv/.csv/.jsonl file.

    A TSV whose first row lacks ``label_column`` is read as the SMS format ``label<TAB>text``.
    """
    from ..data.corpora import DATASETS, fetch_dataset

    path = fetch_dataset(data) if data in DATASETS else Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no such file (nor a known dataset: {', '.join(sorted(DATASETS))})")
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            delim = "," if suffix == ".csv" else "\t"
            raw = list(csv.reader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL))
            raw = [r for r in raw if r]
            if delim == "\t" and raw and label_column not in raw[0]:
                rows = [{label_column: r[0], text_column: "\t".join(r[1:])} for r in raw]
            else:
                header, body = raw[0] if raw else [], raw[1:]
                rows = [dict(zip(header, r)) for r in body]
    if not rows:
        raise ValueError(f"{path}: no records")
    for col in (text_column, label_column):
        if col not in rows[0]:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, rows[0]))}); "
                             "pass --text-column / --label-column")
    records = [(str(r[text_column]), str(r[label_column])) for r in rows]
    if len(label_names(records)) < 2:
        raise ValueError(f"{path}: every record has label {records[0][1]!r}; classification needs two or more")
    return records


def label_names(records) -> list[str]:
    """The labels in sorted order: their index is the class id (ham 0, spam 1 for SMS)."""
    return sorted({label for _, label in records})


def balance(records, seed: int) -> list[tuple[str, str]]:
    """Undersample every class to the size of the smallest (the book: 747 ham, 747 spam); seeded."""
    by = {name: [r for r in records if r[1] == name] for name in label_names(records)}
    n = min(len(v) for v in by.values())
    rng = random.Random(seed)
    out = [r for name in sorted(by) for r in rng.sample(by[name], n)]
    return out


def split(records, seed: int, fractions=(0.7, 0.1)) -> tuple[list, list, list]:
    """Shuffle with ``seed``, then 70/10/20 train/val/test (the book's random_split)."""
    recs = list(records)
    random.Random(seed).shuffle(recs)
    n_train, n_val = int(len(recs) * fractions[0]), int(len(recs) * fractions[1])
    return recs[:n_train], recs[n_train:n_train + n_val], recs[n_train + n_val:]


def encode_batch(texts, tokenizer, max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with ``pad_id`` to the longest, lengths (B,)); each truncated to max_length.

    An empty text becomes the single pad token (length 1), so every row has a last real position.
    """
    seqs = [(tokenizer.encode(t) or [pad_id])[:max_length] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)
