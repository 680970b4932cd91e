"""GSM8K: grade-school math word problems, scored by exact match of the final number.

The model sees "Question: <q>\\nAnswer:" (after k solved examples in the same format) and continues
greedily until a blank line, the next "Question:", or end-of-text.  The answer is the number after
"#### " if the model wrote one (the dataset's own convention, which few-shot examples teach), else
the last number in its text.  Numbers are compared as decimals after removing thousands commas,
"$" and a trailing period, so "1,000.", "$1000" and "1000.00" all equal 1000.
"""
from __future__ import annotations

import os
import re
from decimal import Decimal, InvalidOperation, localcontext

from tqdm.auto import tqdm

from .common import generate_until, read_jsonl

__all__ = [
    "build_prompt",
    "evaluate_gsm8k",
    "extract_answer",
    "format_example",
    "load_gsm8k",
    "normalize_number",
    "same_number",
]

STOPS = ("\n\n", "Question:")
# A number: optional sign and "$", digits with optional thousands commas, optional decimals.  A
# trailing period ("... is 42.") is not part of it: a decimal point needs a digit after it.  The
# look-behind keeps "10-5" from reading as 10 and -5, and "x2" or "1.5.3" from yielding numbers.
_NUMBER = r"(?<![\w.])-?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
_CALCULATOR = re.compile(r"<<[^>]*>>")


def normalize_number(text: str) -> str | None:
    """"$1,234.50" -> "1234.5"; None for text that is not a number after the clean-up."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # normalize() drops trailing zeros ("12.50" -> "12.5", "1000" -> "1E+3"); "f" writes it out in
    # full.  Enough precision that no digit of a long number is rounded away.
    with localcontext() as ctx:
        ctx.prec = max(ctx.prec, len(cleaned))
        return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the number after "####" if there is one, else the last number."""
    marked = _HASHES.search(text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def same_number(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Decimal(a) == Decimal(b)


def format_example(record: dict, with_answer: bool = True) -> str:
    """"Question: ...\\nAnswer: ..." (the answer without the dataset's <<calculator>> notes)."""
    text = f"Question: {record['question'].strip()}\nAnswer:"
    if with_answer:
        text += " " + _CALCULATOR.sub("", record["answer"]).strip()
    return text


def build_prompt(record: dict, shots: list[dict]) -> str:
    """The solved examples, each followed by a blank line, then the question to answer."""
    return "".join(format_example(s) + "\n\n" for s in shots) + format_example(record, with_answer=False)


def load_gsm8k(path: str | os.PathLike | None = None) -> list[dict]:
    """GSM8K records {question, answer}; the pinned test split by default."""
    if path is None:
        from ..data import fetch_dataset

        path = fetch_dataset("gsm8k")
    records = read_jsonl(path)
    for i, r in enumerate(records):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{path}, record {i}: expected string fields 'question' and 'answer'")
    return records


def evaluate_gsm8k(
    model, tokenizer, records: list[dict], *, n_shot: int = 5, fewshot: list[dict] | None = None,
    limit: int | None = None, max_new_tokens: int = 256, progress: bool = True,
) -> dict:
    """{"metrics": {accuracy, correct, n}, "items": per-item prompt-free predictions}.

    The examples are ``fewshot`` when given (a fixed set), else the first ``n_shot`` records of
    ``records`` other than the one being evaluated.
    """
    if not records:
        raise ValueError("no GSM8K records to evaluate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if fewshot is None and n_shot > len(records) - 1:
        raise ValueError(f"{n_shot}-shot needs {n_shot + 1} records, got {len(records)}")
    chosen = range(len(records) if limit is None else min(limit, len(records)))
    items, correct = [], 0
    bar = tqdm(chosen, desc="gsm8k", unit="q", disable=not progress)
    for i in bar:
        record = records[i]
        if fewshot is not None:
            shots = fewshot[:n_shot]
        else:
            shots = [r for j, r in enumerate(records[: n_shot + 1]) if j != i][:n_shot]
        completion = generate_until(model, tokenizer, build_prompt(record, shots), stops=STOPS,
                                    max_new_tokens=max_new_tokens)[0]
        gold, pred = extract_answer(record["answer"]), extract_answer(completion)
        ok = same_number(pred, gold)
        correct += ok
        bar.set_postfix(acc=f"{correct / (len(items) + 1):.3f}")
        items.append({"index": i, "gold": gold, "prediction": pred, "correct": ok, "completion": completion})
    n = len(items)
    return {"metrics": {"accuracy": correct / n, "correct": correct, "n": n}, "items": items}
