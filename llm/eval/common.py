"""What the evaluation tasks share: reading JSONL files, and generation that stops at a string.

``llm.generate`` stops only at an end-of-text token; GSM8K and HumanEval also stop at text
("\\n\\n", "Question:", "\\ndef ", ...), which can only be seen after decoding, so
:func:`generate_until` decodes each row as it grows and ends a row at the first stop string.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.sources import iter_jsonl
from ..generate import stream

__all__ = ["generate_until", "read_jsonl", "truncate_at_stops"]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (gzipped when it ends in .gz); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return [record for _, record in iter_jsonl(path)]


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def generate_until(
    model,
    tokenizer,
    prompt: str,
    *,
    stops: Sequence[str] = (),
    max_new_tokens: int = 256,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """``num_samples`` completions of one prompt, each cut at its first stop string or end-of-text.

    The samples are rows of one batch (the same prompt, so the same length: no padding needed).
    A row is finished when it emits end-of-text or its text contains a stop; generation ends when
    every row is finished or after ``max_new_tokens``.  The stop string is not part of the result.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    eot = tokenizer.eot_token
    ids = tokenizer.encode(prompt) or [eot]  # an empty prompt conditions on <|endoftext|>, as GPT-2 starts documents
    device = next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (n, T)
    new: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    steps = stream(model, idx, max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_token_id=eot, generator=generator)
    # closing(): leaving the loop early must still run stream's cleanup (the model's train mode back).
    with contextlib.closing(steps):
        for token in steps:  # (n,)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t == eot:
                    done[row] = True
                    continue
                new[row].append(t)
                # Only the newest tokens can complete a stop string that was not there a step ago,
                # so decoding a short tail is enough (stop strings are a few tokens long).
                if stops:
                    tail = tokenizer.decode(new[row][-16:])
                    done[row] = any(stop in tail for stop in stops)
            if all(done):
                break
    return [truncate_at_stops(tokenizer.decode(row), stops) for row in new]
