"""The machine-facing half of training setup: device, precision, threads, seeds, kernels, model.

Kept apart from ``llm/train/pretrain.py`` so that the loop there reads like the book; nothing here knows
about steps or losses.  ``cfg`` is a :class:`llm.train.pretrain.TrainConfig`.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from . import distributed

MODEL_OVERRIDES = ("n_layer", "n_head", "n_embd", "dropout", "bias")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available here")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")  # the --dtype choices


class Precision:
    """How the forward and backward run: ``name`` ("float32", "bfloat16" or "float16"), why it was
    chosen (``reason``, printed at start), the autocast context (``autocast()``) and, for float16 only,
    a dynamic loss scaler (``scaler``, a ``torch.amp.GradScaler``; disabled otherwise, when its calls
    pass everything through unchanged).

    bf16 and fp16 autocast run the matmuls in 16 bits while the weights, the optimizer and the loss
    reduction stay fp32.  bf16 has fp32's exponent range, so it needs no loss scaling; fp16 tops out
    at 65504 and flushes gradients below ~6e-8 to zero, so its loss is multiplied by a scale before
    backward and the gradients divided by it before the update, and a step whose gradients overflowed
    (inf/nan) is skipped and the scale halved (it doubles again after 2000 clean steps).
    """

    def __init__(self, device: torch.device, name: str, reason: str):
        self.device_type, self.name, self.reason = device.type, name, reason
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "float16")

    def autocast(self):
        if self.name == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        what = {"float32": "float32", "bfloat16": "bfloat16 autocast",
                "float16": "float16 autocast with dynamic loss scaling (torch.amp.GradScaler)"}[self.name]
        return f"precision: {what} ({self.reason})"

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer, params, grad_clip: float) -> tuple[float | None, bool]:
        """Unscale, clip (when ``grad_clip > 0``) and step; returns (gradient norm or None, whether the
        step was skipped because the fp16 gradients overflowed -- then the norm is None too)."""
        self.scaler.unscale_(optimizer)
        norm = None
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        scale = self.scaler.get_scale()  # 1.0 when disabled
        self.scaler.step(optimizer)  # skipped when any unscaled gradient is inf/nan
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        return (None if skipped else norm), skipped

    def metrics(self, skipped: bool) -> dict:
        """What a step logs about loss scaling: the scale and whether the step was skipped (fp16 only)."""
        return {"loss_scale": self.scaler.get_scale(), "skipped": skipped} if self.scaler.is_enabled() else {}


def choose_precision(device: torch.device, dtype: str) -> Precision:
    """``dtype`` "auto": bf16 autocast on a CUDA GPU that has bf16 (Ampere and newer), fp16 with loss
    scaling on one that does not (T4, V100, RTX 20xx), fp32 on the CPU (its bf16 matmuls are slower
    than fp32 ones on most CPUs) and on MPS.  Anything else is taken as asked."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype != "auto":
        return Precision(device, dtype, "asked for with --dtype")
    if device.type != "cuda":
        return Precision(device, "float32", f"auto: fp32 on {device.type}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu = f"{torch.cuda.get_device_name(index)}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability(index)))}"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Precision(device, "bfloat16", f"auto: {gpu} has bf16")
    return Precision(device, "float16", f"auto: {gpu} has no bf16")


def set_cpu_threads() -> int:
    """One intra-op thread per core, shared fairly between the ranks running on this machine.

    OMP_NUM_THREADS wins when set (torchrun sets it to 1 for multi-process runs, which is right
    for a 2-core machine running 2 ranks); oversubscribing cores makes every rank slower.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, cores // distributed.local_world_size())
    torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Make glibc keep big freed blocks for reuse instead of returning them to the OS (CPU only).

    Every training step allocates and frees the same few hundred-MB tensors (the (B*T, 50257)
    logits and their gradients).  By default glibc serves blocks that large with fresh mmaps, so
    each step page-faults ~3 GB of zeroed memory back in: on 2 cores that kernel time was half of
    the step (1.7 s of a 3.4 s cpu-small step).  Raising the mmap and trim thresholds keeps those
    blocks in the heap; the price is that the process holds on to its peak memory.  Returns
    whether the setting took (False off glibc, e.g. macOS or musl, where nothing changes).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def kernels_backend(name: str):
    """Run the block on the requested kernels backend (``auto`` keeps $LLM_KERNELS / the default)."""
    import kernels

    if name == "auto":
        yield
        return
    with kernels.backend(name):
        yield


def build_model(cfg, ckpt: dict | None, vocab_size: int | None = None):
    """The GPT to train: from a checkpoint (resume), a preset plus overrides, or a Hugging Face folder.

    ``vocab_size`` (the tokenizer's, when it is not GPT-2's) sizes a model from scratch unless an
    override sets it; a checkpoint or pretrained weights keep their own."""
    from ..model import GPT, GPTConfig

    if ckpt is not None:
        from .checkpoint import model_from_checkpoint

        return model_from_checkpoint(ckpt).train()
    overrides = {k: getattr(cfg, k) for k in MODEL_OVERRIDES if getattr(cfg, k) is not None}
    if cfg.block_size is not None:
        overrides["block_size"] = cfg.block_size
    if cfg.init_from == "scratch":
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        return GPT(GPTConfig.from_preset(cfg.preset, **overrides))
    # Pretrained weights fix the shapes: only dropout and a shorter block_size may change.
    fixed = sorted(set(overrides) - {"dropout", "block_size"})
    if fixed:
        raise ValueError(f"--{fixed[0].replace('_', '-')} cannot be changed when starting from {cfg.init_from}")
    return GPT.from_pretrained(cfg.init_from, **overrides)


def planned_block_size(cfg, ckpt: dict | None) -> int | None:
    """The training window length, known before the model is built (None for a Hugging Face
    folder without --block-size: its config.json decides once it is loaded)."""
    from ..model import GPTConfig

    if cfg.block_size is not None:
        return cfg.block_size
    if ckpt is not None:
        return ckpt["model_config"]["block_size"]
    if cfg.init_from == "scratch":
        return GPTConfig.from_preset(cfg.preset).block_size
    return None


def choose_loader_mode(requested: str, n_train: int, tokens_per_step: int, max_steps: int) -> str:
    """``sliding`` (every window once per epoch) when the run will see the train split at least
    once, so a small corpus is covered evenly; ``random`` windows when the corpus outlasts the run."""
    if requested != "auto":
        return requested
    return "sliding" if n_train <= tokens_per_step * max_steps else "random"
