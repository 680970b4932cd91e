"""Model FLOPs per token, MFU and peak memory: one definition, shared by ``bench/train.py`` and the trainers.

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s.  FLOPs per token follow the PaLM
appendix: 6 N for the non-embedding weights (forward 2 N, backward 4 N) plus the attention score and
value matmuls, which depend on the context length T rather than on any weight.  The peaks are vendor
datasheet numbers; an unknown device (every CPU) has none, so MFU is omitted rather than guessed.
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name().  Checked in
# order, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
]


def peak_tflops(device: torch.device) -> float | None:
    """The datasheet peak of a CUDA device, or None (CPU, or a GPU not in the table)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(model, T: int) -> float:
    """Training FLOPs (forward + backward) per token of a GPT at context length ``T``."""
    cfg = model.config
    # attention's q k^T and p v: 2 * 2 * T * (n_head * head_dim) per token and layer, halved for causal, x3 with backward
    return 6 * model.num_parameters(non_embedding=True) + 6 * cfg.n_layer * T * cfg.n_head * cfg.head_dim


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory this run has held so far, MiB: the CUDA caching allocator's peak of allocated
    tensors, or on a CPU the process's peak resident set (``getrusage``; None on Windows and MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type != "cpu":
        return None
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def mfu_pct(tok_per_s: float, fpt: float, peak_tflops_: float | None) -> float | None:
    """Model FLOPs utilisation in percent, or None when the device's peak is unknown."""
    return 100 * tok_per_s * fpt / (peak_tflops_ * 1e12) if peak_tflops_ else None


def step_performance(tok_per_s: float, flops_per_token_: float, peak_tflops_: float | None,
                     device: torch.device) -> dict:
    """What a training step's record says besides tok/s: ``mfu_pct`` (only where the device's peak is
    known) and ``peak_mem_mb`` (where it can be read).  ``tok_per_s`` is one device's."""
    out = {}
    mfu = mfu_pct(tok_per_s, flops_per_token_, peak_tflops_)
    if mfu is not None:
        out["mfu_pct"] = mfu
    mem = peak_memory_mb(device)
    if mem is not None:
        out["peak_mem_mb"] = mem
    return out
