"""What "auto" runs on the CPU: per op and shape, the backend that measured fastest.

On a CPU the fastest correct implementation depends on the shape: PyTorch's own ops win one op at
one width, the extension's C++ kernels another, the reference a third.  So "auto" on the CPU does not
guess: ``bench/cpu_dispatch.py`` times every op, forward and backward, on every backend that runs on
the CPU, on a grid of the shapes GPT training meets, and writes the times to a JSON table; this module
reads it and, for a call, picks the fastest *available* backend at the measured shape nearest to the
call's (distance: the sum of |log(size / measured size)| over the op's dimensions).

The table shipped in the package (``kernels/cpu_dispatch.json``) was measured on the machine named in
it; ``python bench/cpu_dispatch.py --write-table PATH`` measures yours, and ``LLM_CPU_DISPATCH=PATH``
makes "auto" read that one instead.  Only float32 calls are decided by the table (it is what CPU
training runs in, and what was measured); every other dtype, and every call when no table can be
read, runs on the reference.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

FORMAT = "llm-cpu-dispatch-1"
SHIPPED = Path(__file__).with_name("cpu_dispatch.json")
FALLBACK = "torch"
CANDIDATES = ("torch", "pytorch", "cuda")  # backends that run on the CPU at training speed (not Triton's interpreter)


def shape_key(op: str, *tensors: torch.Tensor) -> dict[str, int]:
    """The dimensions of a call that the table is indexed by (the op's first tensors, as the API takes them)."""
    first = tensors[0]
    if op in ("causal_attention", "rope"):  # q or x (B, H, T, D)
        return {"BH": first.shape[0] * first.shape[1], "T": first.shape[2], "D": first.shape[3]}
    if op in ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "swiglu"):  # x or gate (..., C)
        return {"M": first.numel() // max(first.shape[-1], 1), "C": first.shape[-1]}
    if op == "cross_entropy":  # logits (..., V)
        return {"N": first.numel() // max(first.shape[-1], 1), "V": first.shape[-1]}
    if op == "linear_cross_entropy":  # hidden (..., C), weight (V, C)
        return {"N": first.numel() // max(first.shape[-1], 1), "C": first.shape[-1], "V": tensors[1].shape[0]}
    raise AssertionError(op)


class Table:
    """A measured table: ``entries[op]`` is a list of (shape dims, {backend: ms})."""

    def __init__(self, data: dict, source: str):  # source: the path, for the error message
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a CPU dispatch table (format {data.get('format')!r}, want {FORMAT!r})")
        self.entries = {op: [(e["shape"], e["ms"]) for e in rows] for op, rows in data["ops"].items()}
        self._cache: dict[tuple, str] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Table:
        return cls(json.loads(Path(path).read_text()), str(path))

    def fastest(self, op: str, shape: dict[str, int], available) -> str:
        """The fastest backend for which ``available(name)`` holds, at the measured shape nearest ``shape``."""
        key = (op, *sorted(shape.items()))
        if key not in self._cache:
            self._cache[key] = self._choose(op, shape, available)
        return self._cache[key]

    def _choose(self, op: str, shape: dict[str, int], available) -> str:
        rows = self.entries.get(op)
        if not rows:
            return FALLBACK

        def distance(measured: dict[str, int]) -> float:
            return sum(abs(math.log(max(shape[d], 1) / max(measured[d], 1))) for d in shape if d in measured)

        _, times = min(rows, key=lambda row: distance(row[0]))
        ranked = sorted((ms, name) for name, ms in times.items() if isinstance(ms, (int, float)))
        return next((name for _, name in ranked if available(name)), FALLBACK)


_table: Table | None = None
_table_error: str | None = None


def table() -> Table | None:
    """The table "auto" reads ($LLM_CPU_DISPATCH, else the shipped one), loaded once; None if unreadable."""
    global _table, _table_error
    if _table is None and _table_error is None:
        path = os.environ.get("LLM_CPU_DISPATCH") or SHIPPED
        try:
            _table = Table.load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _table_error = f"cannot read the CPU dispatch table {path} ({exc}); auto runs the reference on the CPU"
            warnings.warn(f"kernels: {_table_error}", stacklevel=2)
    return _table


def reset() -> None:
    """Forget the loaded table (tests; or after pointing LLM_CPU_DISPATCH elsewhere)."""
    global _table, _table_error
    _table, _table_error = None, None
