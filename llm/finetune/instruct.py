"""Instruction data in the Alpaca format (the book's chapter 7): prompts, splits, batches.

    format_input(entry)       "Below is an instruction ... ### Instruction:\\n...[### Input:\\n...]"
    format_response(entry)    "\\n\\n### Response:\\n{output}"
    load_records(...)         the JSON list, every record checked for its keys
    split_records(...)        85% train, 10% test, the last 5% validation, as the book does
    InstructionDataset        records tokenized once (prompt and response kept apart)
    collate(...)              pad to the batch's longest + 1, targets shifted, ignore_index masking

The prompt, the response header and the answer are tokenized separately and concatenated, so the
number of prompt tokens is exact (a BPE merge across a seam cannot move it) and generation feeds the
very ids the model was trained on: ``prompt_ids(entry)`` is the prompt and "### Response:\\n".
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "PREAMBLE", "RESPONSE_HEADER", "EOT", "IGNORE_INDEX", "format_input", "format_response", "load_records",
    "split_records", "InstructionDataset", "collate", "encode_parts", "prompt_ids", "INSTRUCTION_KEYS",
]

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
EOT = 50256  # GPT-2's <|endoftext|>: the end of every response, and the padding (the runs pass their
# tokenizer's eot_token instead, for a tokenizer.json)
IGNORE_INDEX = -100  # the target id the loss skips (torch's and kernels.cross_entropy's default)
INSTRUCTION_KEYS = ("instruction", "input", "output")


def format_input(entry: dict) -> str:
    """The prompt: preamble, instruction, and the input section only when the input is not empty."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


def format_response(entry: dict, key: str = "output") -> str:
    """The part the model learns to write: the response header and ``entry[key]``."""
    return f"{RESPONSE_HEADER}{entry[key]}"


def encode_parts(entry: dict, tokenizer, key: str = "output") -> tuple[list[int], list[int], list[int]]:
    """(prompt, response header, answer) token ids, each tokenized on its own.

    ``allow_special=False``: a literal "<|endoftext|>" in the data is text, not the stop token.
    """
    enc = lambda text: tokenizer.encode(text, allow_special=False)
    return enc(format_input(entry)), enc(RESPONSE_HEADER), enc(entry[key])


def prompt_ids(entry: dict, tokenizer) -> list[int]:
    """Token ids to generate a response from: the prompt followed by the response header."""
    prompt, header, _ = encode_parts(entry, tokenizer)
    return prompt + header


def resolve_data_path(data: str | Path) -> Path:
    """A registry name (``llm.data.DATASETS``) or a path to a JSON/JSONL file."""
    from ..data import DATASETS, fetch_dataset

    if str(data) in DATASETS:
        return fetch_dataset(str(data))
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {str(data)!r} is neither a known dataset "
                                f"({', '.join(sorted(DATASETS))}) nor an existing file")
    return path


def load_records(data: str | Path = "instruction-data", keys: Sequence[str] = INSTRUCTION_KEYS,
                 limit: int | None = None) -> list[dict]:
    """The records of a JSON list (or JSONL) file; each must be an object with string ``keys``.

    ``limit`` keeps the first N records (quick runs and tests).  A bad record is a ValueError that
    names its index and the problem, not a KeyError deep inside training.
    """
    path = resolve_data_path(data)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, expected an object with keys {list(keys)}")
        missing = [k for k in keys if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} is missing key(s) {', '.join(map(repr, missing))} "
                             f"(has {', '.join(map(repr, rec))})")
        bad = [k for k in keys if not isinstance(rec[k], str)]
        if bad:
            raise ValueError(f"{path}: record {i} key {bad[0]!r} must be a string, got {type(rec[bad[0]]).__name__}")
    return records


def split_records(records: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.10,
                  seed: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test): the first 85% train, the next 10% test, the rest (5%) validation.

    That is the book's order (train, test, then validation from what is left), so with the
    defaults and no seed the splits are exactly chapter 7's.  ``seed`` shuffles a copy first.
    """
    if not (0 < train_frac < 1 and 0 <= test_frac < 1 and train_frac + test_frac <= 1):
        raise ValueError(f"need 0 < train_frac, 0 <= test_frac, train_frac + test_frac <= 1; "
                         f"got {train_frac}, {test_frac}")
    records = list(records)
    if seed is not None:
        random.Random(seed).shuffle(records)
    n_train, n_test = int(len(records) * train_frac), int(len(records) * test_frac)
    train = records[:n_train]
    test = records[n_train:n_train + n_test]
    val = records[n_train + n_test:]
    return train, val, test


class InstructionDataset(Dataset):
    """Records tokenized once: item i is ``(ids, prompt_len)``, ids = prompt + response tokens.

    The end-of-text token is not stored: :func:`collate` appends it, as the book's collate does.
    """

    def __init__(self, records: Sequence[dict], tokenizer, response_key: str = "output"):
        self.records = list(records)
        self.items: list[tuple[list[int], int]] = []
        for rec in self.records:
            prompt, header, answer = encode_parts(rec, tokenizer, response_key)
            # The header is a target even with mask_prompt (as in the book): only instruction + input are masked.
            self.items.append((prompt + header + answer, len(prompt)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.items[i]


def collate(batch: Sequence[tuple[Sequence[int], int] | Sequence[int]], *, pad_token_id: int = EOT,
            ignore_index: int = IGNORE_INDEX, allowed_max_length: int | None = None, mask_prompt: bool = False,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of token lists into (inputs, targets), both (B, T) int64.

    Each item is ``(ids, prompt_len)`` (what :class:`InstructionDataset` yields) or plain ``ids``.
    Every sequence gets ``pad_token_id`` appended as its end-of-text token (GPT-2 pads with
    <|endoftext|>), then more of it up to the longest item + 1; inputs drop the last position and
    targets the first (the next-token shift), so T is the longest item's length, as in the book's
    ``custom_collate_fn``.  In the targets the first end-of-text stays (the model must learn to
    stop) and the later padding becomes ``ignore_index``; with ``mask_prompt`` so do the targets
    that predict prompt tokens (positions 0 .. prompt_len-2), so only the response is learned.
    ``allowed_max_length`` then truncates both to that many positions.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    items = [(list(b[0]), int(b[1])) if _is_pair(b) else (list(b), 0) for b in batch]
    if any(len(ids) == 0 for ids, _ in items):
        raise ValueError(f"collate got an empty token list (item {[len(ids) for ids, _ in items].index(0)})")
    longest = max(len(ids) for ids, _ in items) + 1  # + 1 for the end-of-text token
    inputs, targets = [], []
    for ids, prompt_len in items:
        # the first pad_token_id is the end-of-text token (GPT-2 pads with <|endoftext|>, as the book does)
        seq = ids + [pad_token_id] * (longest - len(ids))  # (longest,)
        x = torch.tensor(seq[:-1], dtype=torch.long)  # (longest - 1,)
        y = torch.tensor(seq[1:], dtype=torch.long)  # (longest - 1,)
        # Positions len(ids) .. are padding targets; the first (len(ids) - 1) predicts the EOT and stays.
        y[len(ids):] = ignore_index
        if mask_prompt and prompt_len > 1:
            y[:prompt_len - 1] = ignore_index  # target t is token t + 1: these predict prompt tokens
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)  # (B, T) each


def _is_pair(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int) and not isinstance(item[0], int)
