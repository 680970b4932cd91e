"""The one place that decides which implementation of an op runs.

Backends, by name:

* ``"torch"``  -- the pure-PyTorch reference (``kernels/reference.py``); runs on any device.
* ``"pytorch"`` -- PyTorch's own fused ops (SDPA, ``F.layer_norm``, ``F.cross_entropy``): the
  baseline to beat, as nanoGPT uses them (``kernels/_pytorch_backend.py``); runs on any device.
* ``"triton"`` -- hand-written Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``"cuda"``   -- the C++/CUDA extension ``kernels._C`` built by ``pip install -e .``.
* ``"auto"``   -- the fastest backend that can run on the tensors' device (the default).

The choice comes, in order, from ``with kernels.backend(name):``, ``kernels.set_backend(name)``,
the ``LLM_KERNELS`` environment variable, and finally ``"auto"``.

A backend provides an op by registering an implementation with :func:`register`.  An explicitly
requested backend that cannot run an op raises :class:`BackendUnavailableError` naming what is
missing; "auto" falls back along its preference list and says so once.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "torch", "pytorch", "triton", "cuda")
OPS = ("causal_attention", "layer_norm", "add_layer_norm", "cross_entropy", "linear_cross_entropy",
       "rms_norm", "add_rms_norm", "rope", "swiglu")

# What "auto" tries, fastest first, per device type; a backend that cannot run an op (not built,
# unsupported shape or dtype) is skipped with a one-time notice.
#
# * CUDA: our Triton kernels, then PyTorch's own fused ops, then the reference.  The Triton kernels
#   pass every test, forward and backward, in Triton's interpreter on the CPU (fp32 and fp16); they
#   have not yet run on a GPU in this version (no GPU was lent while they were written): the GPU
#   tests (`pytest -m gpu`) and bench/gpu_session.sh are the first thing to run on one.
# * CPU: per op and shape, whichever of the reference, PyTorch's own ops and the extension's C++
#   kernels measured fastest there (float32; the table bench/cpu_dispatch.py writes and
#   kernels/_cpu_dispatch.py reads), else the reference.  Triton's interpreter is far too slow to train
#   with.  `--kernels torch` (LLM_KERNELS=torch) keeps the readable reference on the CPU.
# * MPS (Apple GPUs) and any other device: PyTorch's own fused ops, which run there, then the
#   reference.  Triton and the extension never run there (they say so when asked for by name).
# * "cuda" (the C++/CUDA extension) joins a list only on evidence: its GPU tests passed on a real
#   device and its benchmark beat the backend after it, with the logs under bench/results/.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "pytorch", "torch"),
    "cpu": ("torch",),  # the fallback: float32 calls are decided by the measured table (see resolve)
    "mps": ("pytorch", "torch"),
}
OTHER_DEVICES = ("pytorch", "torch")  # what "auto" tries on a device type not listed above

_IMPLS: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS if name != "auto"}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("llm_kernels_backend", default=None)
_warned: set[tuple[str, str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the requested op on the given device."""


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r} from {source}; choose one of {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Choose the backend for every following op call in this context.

    ``None`` returns to the default ($LLM_KERNELS, else "auto"); any name, "auto" included, is an
    explicit choice that wins over $LLM_KERNELS.
    """
    _override.set(None if name is None else _check_name(name, "set_backend()"))


def get_backend() -> str:
    """The requested backend name: set_backend/backend() first, then $LLM_KERNELS, then "auto"."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("LLM_KERNELS", "auto"), "the LLM_KERNELS environment variable")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with kernels.backend("torch"): ...`` runs the block on that backend, then restores the previous one."""
    token = _override.set(_check_name(name, "backend()"))
    try:
        yield
    finally:
        _override.reset(token)


def register(backend_name: str, op: str) -> Callable[[Callable], Callable]:
    """Decorator: ``@register("triton", "layer_norm")`` makes a function that backend's ``layer_norm``."""
    if backend_name not in _IMPLS:
        raise ValueError(f"cannot register for backend {backend_name!r}; known: {', '.join(_IMPLS)}")
    if op not in OPS:
        raise ValueError(f"cannot register unknown op {op!r}; known: {', '.join(OPS)}")

    def decorator(fn: Callable) -> Callable:
        _IMPLS[backend_name][op] = fn
        return fn

    return decorator


_load_reasons: dict[str, str | None] = {}


def _load_backend(name: str) -> str | None:
    """Import the backend's modules so they can register; return why it cannot run, or None.

    Cached: an import that failed once (e.g. no extension built) is not retried on every op call.
    (A plain dict, not functools.cache, so torch.compile reads the cached answer instead of tracing
    the imports again.)
    """
    if name not in _load_reasons:
        _load_reasons[name] = _import_backend(name)
    return _load_reasons[name]


def _import_backend(name: str) -> str | None:
    if name == "torch":
        from . import _torch_backend  # noqa: F401  (registers the reference)
        return None
    if name == "pytorch":
        from . import _pytorch_backend  # noqa: F401  (registers PyTorch's own ops)
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc}); `pip install triton`"
        try:
            from . import _triton_backend  # noqa: F401  (registers the Triton kernels)
        except ImportError as exc:
            return f"the Triton kernels failed to import ({exc})"
        return None
    if name == "cuda":
        try:
            from . import _C  # noqa: F401
        except ImportError as exc:
            return f"the C++/CUDA extension kernels._C is not built or failed to load ({exc}); run `pip install -e . --no-build-isolation`"
        from . import _cuda_backend  # noqa: F401  (fakes, autograd and the backend's ops)
        return None
    raise AssertionError(name)


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter, read as Triton itself reads TRITON_INTERPRET
    ("1", "true", "on", "yes", any case), now."""
    try:
        from triton import knobs
    except ImportError:  # no triton (or one without knobs): the same parsing by hand
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")
    return bool(knobs.runtime.interpret)


def unavailable_reason(name: str, op: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run ``op`` on ``device``, or None when it can."""
    reason = _load_backend(name)
    if reason:
        return reason
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU), got tensors on {device}"
    if name == "cuda" and device.type not in ("cuda", "cpu"):
        return f"the extension's kernels run on CUDA and CPU tensors only, got tensors on {device}"
    if op not in _IMPLS[name]:
        return f"this version of the package has no {name} implementation of {op}"
    return None


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each concrete backend: None if it can run every op on ``device``, else the first reason it cannot."""
    device = torch.device(device)
    report = {}
    for name in _IMPLS:
        reasons = [unavailable_reason(name, op, device) for op in OPS]
        report[name] = next((r for r in reasons if r), None)
    return report


def backend_for(op: str, device: torch.device | str, *tensors: torch.Tensor) -> str:
    """The name of the backend that :func:`resolve` runs ``op`` on for ``device`` (quietly: no
    warnings); on the CPU pass the call's tensors too, or the answer is the fallback's."""
    requested = get_backend()
    return requested if requested != "auto" else _auto_choice(op, torch.device(device), tensors, warn=False)


def _auto_choice(op: str, device: torch.device, tensors: tuple[torch.Tensor, ...], *, warn: bool) -> str:
    """What "auto" runs: on the CPU the measured choice, else the first available backend of the
    device's preference list (with ``warn``, saying once for each one it skips why)."""
    measured = _cpu_measured_choice(op, device, tensors)
    if measured is not None:
        _load_backend(measured)  # the table's fallback (the reference) may not have been imported yet
        return measured
    for name in AUTO_PREFERENCE.get(device.type, OTHER_DEVICES):
        reason = unavailable_reason(name, op, device)
        if reason is None:
            return name
        key = (name, op, device.type)
        if warn and key not in _warned:
            _warned.add(key)
            # stacklevel: this function, resolve, the kernels.<op> wrapper, then the caller's line
            warnings.warn(f"kernels: auto skips the {name} backend for {op} on {device.type}: {reason}", stacklevel=4)
    raise AssertionError("the torch backend runs everywhere")  # pragma: no cover


def _cpu_measured_choice(op: str, device: torch.device, tensors: tuple[torch.Tensor, ...]) -> str | None:
    """On the CPU, for float32 tensors: the fastest available backend at this shape by the measured
    table (kernels/_cpu_dispatch.py); None elsewhere, or without a table."""
    if device.type != "cpu" or not tensors or tensors[0].dtype != torch.float32:
        return None
    from . import _cpu_dispatch

    table = _cpu_dispatch.table()
    if table is None:
        return None
    return table.fastest(op, _cpu_dispatch.shape_key(op, *tensors),
                         lambda name: unavailable_reason(name, op, device) is None)


def resolve(op: str, device: torch.device, *tensors: torch.Tensor) -> Callable:
    """The implementation of ``op`` to run on tensors living on ``device`` (``tensors``: the call's
    leading tensors, which on the CPU decide "auto" by shape)."""
    requested = get_backend()
    if requested != "auto":
        reason = unavailable_reason(requested, op, device)
        if reason:
            raise BackendUnavailableError(f"kernels backend {requested!r} cannot run {op} on {device}: {reason}")
        return _IMPLS[requested][op]
    return _IMPLS[_auto_choice(op, device, tensors, warn=True)][op]
