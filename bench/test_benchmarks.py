"""The benchmark measurements as pytest-benchmark cases, for tracking them over time.

    pytest bench --benchmark-only                                 # run them (not part of plain `pytest`)
    pytest bench --benchmark-only --benchmark-autosave            # keep a record under .benchmarks/
    pytest bench --benchmark-only --benchmark-compare             # against the last saved record

One case per op (attention, layernorm, RMSNorm, cross-entropy, linear-CE) x provider x mode (fwd, fwd+bwd).
On the CPU only the pure-PyTorch reference and PyTorch's own ops run, on small shapes (Triton's
interpreter is far too slow to be worth timing); on a GPU our "triton" and "cuda" backends join
them (skipped with the reason when they cannot run) on model-sized shapes, and every call ends with
a ``torch.cuda.synchronize`` so the wall clock pytest-benchmark reads covers the kernels.  The
scripts in this folder (``python bench/layernorm.py`` ...) remain the way to compare providers
side by side with bandwidth figures; these cases give the time series.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench import attention as attention_bench
from bench.common import on_backend
from bench import cross_entropy as ce_bench
from bench import layernorm as ln_bench
from bench import rmsnorm as rms_bench
from kernels.backends import unavailable_reason

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
OURS = ("triton", "cuda") if CUDA else ()
MODES = ("fwd", "fwd+bwd")

# (B, H, T, D) / (M, C) / (N, V) / (N, H, V): small on the CPU, model-sized on a GPU.
ATTN_SHAPE = (4, 16, 1024, 64) if CUDA else (1, 2, 64, 16)
LN_SHAPE = (16384, 1024) if CUDA else (256, 768)
CE_SHAPE = (8192, 50257) if CUDA else (64, 2048)
LCE_SHAPE = (8192, 768, 50257) if CUDA else (64, 64, 2048)


def _ours(op: str, name: str):
    reason = unavailable_reason(name, op, DEVICE)
    if reason:
        pytest.skip(f"{name}: {reason}")
    return on_backend(op, name)


def _run(benchmark, fn, inputs, mode):
    """Benchmark ``fn(*inputs)`` (fwd, no grad) or it plus the gradients of its differentiable inputs."""
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def call():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(*inputs)
        else:
            out = fn(*inputs)
            if isinstance(out, tuple):
                out = sum(o.float().sum() for o in out)
            elif out.dim():
                out = out.float().sum()
            out = torch.autograd.grad(out, diff)
        if CUDA:
            torch.cuda.synchronize()
        return out

    call()  # first call outside the timing: Triton compiles, cuDNN picks algorithms
    benchmark(call)


ATTN_PROVIDERS = [*OURS, "reference", "sdpa-math"] + (["sdpa-flash", "sdpa-efficient"] if CUDA else [])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
def test_attention(benchmark, provider, mode):
    if provider in OURS:
        fn = _ours("causal_attention", provider)
    elif provider == "reference":
        fn = kernels.reference.causal_attention
    else:
        fn = attention_bench.sdpa_provider({"sdpa-math": "math", "sdpa-flash": "flash_attention",
                                            "sdpa-efficient": "efficient_attention"}[provider])
    q, k, v = (torch.randn(*ATTN_SHAPE, dtype=DTYPE, device=DEVICE, requires_grad=True) for _ in range(3))
    benchmark.extra_info.update(shape=list(ATTN_SHAPE), dtype=str(DTYPE))
    _run(benchmark, fn, (q, k, v), mode)


LN_PROVIDERS = [*OURS, *(["add-ln-triton"] if CUDA else []), "reference", "F.layer_norm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", LN_PROVIDERS)
def test_layernorm(benchmark, provider, mode):
    M, C = LN_SHAPE
    x = torch.randn(M, C, dtype=DTYPE, device=DEVICE, requires_grad=True)
    w = torch.ones(C, dtype=DTYPE, device=DEVICE, requires_grad=True)
    b = torch.zeros(C, dtype=DTYPE, device=DEVICE, requires_grad=True)
    inputs = (x, w, b)
    if provider == "add-ln-triton":
        fn = _ours("add_layer_norm", "triton")
        inputs = (x, torch.randn_like(x, requires_grad=True), w, b)
    elif provider in OURS:
        fn = _ours("layer_norm", provider)
    elif provider == "reference":
        fn = ln_bench.reference_layer_norm
    else:
        fn = ln_bench.f_layer_norm
    benchmark.extra_info.update(shape=[M, C], dtype=str(DTYPE))
    _run(benchmark, fn, inputs, mode)


RMS_PROVIDERS = [*OURS, *(["add-rms-triton"] if CUDA else []), "reference", "F.rms_norm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", RMS_PROVIDERS)
def test_rmsnorm(benchmark, provider, mode):
    M, C = LN_SHAPE
    x = torch.randn(M, C, dtype=DTYPE, device=DEVICE, requires_grad=True)
    w = torch.ones(C, dtype=DTYPE, device=DEVICE, requires_grad=True)
    inputs = (x, w)
    if provider == "add-rms-triton":
        fn = _ours("add_rms_norm", "triton")
        inputs = (x, torch.randn_like(x, requires_grad=True), w)
    elif provider in OURS:
        fn = _ours("rms_norm", provider)
    elif provider == "reference":
        fn = rms_bench.reference_rms_norm
    else:
        fn = rms_bench.f_rms_norm
    benchmark.extra_info.update(shape=[M, C], dtype=str(DTYPE))
    _run(benchmark, fn, inputs, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", [*OURS, "reference", "F.cross_entropy"])
def test_cross_entropy(benchmark, provider, mode):
    N, V = CE_SHAPE
    fn = {"reference": kernels.reference.cross_entropy, "F.cross_entropy": F.cross_entropy}.get(provider)
    fn = fn or _ours("cross_entropy", provider)
    logits = torch.randn(N, V, dtype=DTYPE, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    benchmark.extra_info.update(shape=[N, V], dtype=str(DTYPE))
    _run(benchmark, fn, (logits, targets), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", [*OURS, "reference", "F.cross_entropy"])
def test_linear_cross_entropy(benchmark, provider, mode):
    N, H, V = LCE_SHAPE
    fn = {"reference": kernels.reference.linear_cross_entropy,
          "F.cross_entropy": ce_bench.unfused_linear_cross_entropy}.get(provider)
    fn = fn or _ours("linear_cross_entropy", provider)
    hidden = torch.randn(N, H, dtype=DTYPE, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(DTYPE).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    benchmark.extra_info.update(shape=[N, H, V], dtype=str(DTYPE))
    _run(benchmark, fn, (hidden, weight, targets), mode)
