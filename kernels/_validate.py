"""Input checks shared by every backend, run once in the public API before dispatch.

A kernel that gets a wrong shape either crashes with an unreadable launch error or, worse, reads
out of bounds and returns garbage.  So every op checks what it is given and raises a ``TypeError``
(not a tensor, wrong dtype) or ``ValueError`` (shape, size, device, value) whose message names the
op, the argument and what it got.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES, kind: str = "floating-point") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be a {kind} tensor ({allowed}), got {t.dtype}")
    return t


def _same_device(op: str, named: dict[str, torch.Tensor]) -> None:
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on the same device, got {listing}")


def _same_dtype(op: str, named: dict[str, torch.Tensor]) -> None:
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: tensors must share one dtype, got {listing}")


def _number(op: str, name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{op}: {name} must be a finite {'positive ' if positive else ''}number, got {value}")
    return value


def check_attention(q, k, v, scale) -> None:
    op = "causal_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, T, D), got {_describe(t)}")
        if 0 in t.shape:
            raise ValueError(f"{op}: {name} must not be empty, got {_describe(t)}")
    _same_dtype(op, {"q": q, "k": k, "v": v})
    _same_device(op, {"q": q, "k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    (B, H, Tq, D), (Bk, Hk, Tk, Dk) = q.shape, k.shape
    if (B, D) != (Bk, Dk):
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch and head dim (B, _, _, D)"
        )
    if H % Hk:
        raise ValueError(
            f"{op}: q's {H} heads must be a multiple of k/v's {Hk} (grouped-query attention shares each k/v head "
            f"among H / H_kv query heads), got q {tuple(q.shape)} and k/v {tuple(k.shape)}"
        )
    if Tq > Tk:
        raise ValueError(
            f"{op}: q has more positions than k/v (Tq={Tq} > Tk={Tk}); the queries must be the last Tq of the Tk positions"
        )
    if scale is not None:
        _number(op, "scale", scale, positive=True)


def check_layer_norm(x, weight, bias, eps, op: str = "layer_norm") -> None:
    _tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension to normalize over, got {_describe(x)}")
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        _tensor(op, name, t)
        if t.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},) to match x's last dim, got {_describe(t)}")
    _same_device(op, {"x": x, "weight": weight, "bias": bias})
    _number(op, "eps", eps, positive=True)


def check_add_layer_norm(x, residual, weight, bias, eps) -> None:
    op = "add_layer_norm"
    check_layer_norm(x, weight, bias, eps, op)
    _tensor(op, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {_describe(residual)}")
    _same_dtype(op, {"x": x, "residual": residual})
    _same_device(op, {"x": x, "residual": residual})


def _check_targets(op: str, targets, lead_shape: torch.Size, V: int, ignore_index) -> None:
    _tensor(op, "targets", targets, INDEX_DTYPES, kind="integer")
    if targets.shape != lead_shape:
        raise ValueError(
            f"{op}: targets must have shape {tuple(lead_shape)} (one class id per row), got {_describe(targets)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    # Checking values needs the data on the host; on a GPU that is a sync per call, so it is done on
    # CPU tensors only (out-of-range targets on a GPU trip the kernels' own bounds masks instead), and
    # not while torch.compile traces (a data-dependent branch would break the graph).
    if targets.device.type == "cpu" and targets.numel() > 0 and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            pos = int(bad.flatten().nonzero()[0])
            raise ValueError(
                f"{op}: targets must be in [0, {V}) or equal ignore_index={ignore_index}; "
                f"found {int(targets.flatten()[pos])} at flat position {pos}"
            )


def check_cross_entropy(logits, targets, ignore_index) -> None:
    op = "cross_entropy"
    _tensor(op, "logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"{op}: logits must be (N, V) or (..., V), got {_describe(logits)}")
    if logits.shape[-1] == 0 or logits.numel() == 0:
        raise ValueError(f"{op}: logits must not be empty, got {_describe(logits)}")
    _check_targets(op, targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    _same_device(op, {"logits": logits, "targets": targets})


def check_linear_cross_entropy(hidden, weight, targets, ignore_index) -> None:
    op = "linear_cross_entropy"
    _tensor(op, "hidden", hidden)
    _tensor(op, "weight", weight)
    if hidden.dim() < 2 or hidden.numel() == 0:
        raise ValueError(f"{op}: hidden must be a non-empty (N, C) or (..., C) tensor, got {_describe(hidden)}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{op}: weight must be a non-empty (V, C) tensor, got {_describe(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight (V, C) = {tuple(weight.shape)} must match hidden's last dim C = {hidden.shape[-1]}"
        )
    _same_dtype(op, {"hidden": hidden, "weight": weight})
    _check_targets(op, targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    _same_device(op, {"hidden": hidden, "weight": weight, "targets": targets})


def check_rms_norm(x, weight, eps, op: str = "rms_norm") -> None:
    _tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension to normalize over, got {_describe(x)}")
    _tensor(op, "weight", weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},) to match x's last dim, got {_describe(weight)}")
    _same_device(op, {"x": x, "weight": weight})
    _number(op, "eps", eps, positive=True)


def check_add_rms_norm(x, residual, weight, eps) -> None:
    op = "add_rms_norm"
    check_rms_norm(x, weight, eps, op)
    _tensor(op, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {_describe(residual)}")
    _same_dtype(op, {"x": x, "residual": residual})
    _same_device(op, {"x": x, "residual": residual})


def check_rope(x, cos, sin) -> None:
    op = "rope"
    _tensor(op, "x", x)
    if x.dim() != 4 or 0 in x.shape:
        raise ValueError(f"{op}: x must be a non-empty 4-D (B, H, T, D) tensor, got {_describe(x)}")
    T, D = x.shape[2], x.shape[3]
    if D % 2:
        raise ValueError(f"{op}: x's head dim D must be even (it rotates D/2 pairs), got {_describe(x)}")
    for name, t in (("cos", cos), ("sin", sin)):
        _tensor(op, name, t, (torch.float32,), kind="float32")
        if t.shape != (T, D // 2):
            raise ValueError(
                f"{op}: {name} must have shape (T, D/2) = ({T}, {D // 2}) for x {tuple(x.shape)}, got {_describe(t)}"
            )
    _same_device(op, {"x": x, "cos": cos, "sin": sin})


def check_swiglu(gate, up) -> None:
    op = "swiglu"
    for name, t in (("gate", gate), ("up", up)):
        _tensor(op, name, t)
        if t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty tensor, got {_describe(t)}")
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have the same shape, got gate {tuple(gate.shape)} and up {tuple(up.shape)}")
    _same_dtype(op, {"gate": gate, "up": up})
    _same_device(op, {"gate": gate, "up": up})
