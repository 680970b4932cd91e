"""End-to-end training throughput of the GPT: every backend side by side, in one run.

    python bench/train.py                  # GPU: gpt2 and gpt2-medium, T = 1024, bf16 autocast, fused AdamW
    python bench/train.py --quick          # CPU-sized smoke run (tiny preset, fp32; what CI runs)
    python bench/train.py --device cpu     # CPU: cpu-small and gpt2 at B=4, T=64, fp32, beside the matmul floor

Each provider trains the same model (same seed, same fixed batch) for ``--warmup`` untimed steps
(compilation, autotuning, allocator warm-up) and then ``--steps`` timed ones; a step is forward,
backward, gradient clipping and an AdamW update, exactly the loop ``llm pretrain`` runs.

Providers:

* ``reference``        -- our GPT on the pure-PyTorch reference ops (``kernels`` backend "torch"), eager;
* ``pytorch+compile``  -- the "PyTorch-native" baseline built the way nanoGPT builds it:
  ``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.cross_entropy`` on materialized logits
  (the "pytorch" backend), fused AdamW and ``torch.compile`` of the whole model;
* ``pytorch``          -- the same without ``torch.compile``;
* ``triton``, ``cuda`` -- our kernels, eager; ``triton+compile``, ``cuda+compile`` with
  ``torch.compile`` on top (our ops are opaque to the compiler, which fuses what lies between them);
  on the CPU ``cuda`` is the extension's C++ CPU kernels;
* ``auto``             -- whatever ``--kernels auto`` (the default of ``llm pretrain``) runs on this device.

A provider that cannot run (backend not built, no GPU for torch.compile's Triton codegen, out of
memory) is reported as skipped with the reason, never silently dropped.

Metrics: tokens/s, ms/step, peak memory (``torch.cuda.max_memory_allocated``), the final loss (the
providers start from the same weights and batch, so their losses after the same steps should agree
to bf16 noise: a cheap cross-check), and MFU = achieved FLOP/s / the GPU's peak dense bf16 FLOP/s,
with FLOPs per token = 6·N + 6·L·T·d: 6·N for the forward and backward matmuls of the N
non-embedding parameters (the tied LM head included, the position table not), plus the attention
score and value matmuls, 12·L·T·d halved by the causal mask (as in the PaLM paper's appendix B).
The peaks come from :data:`llm.train.flops.PEAK_BF16_TFLOPS` (vendor datasheets, dense, no sparsity).  On a CPU the
ceiling is measured in the same run instead, right before each provider (a VM's clock drifts: one
rate at the start moved between 264 and 343 GFLOP/s from run to run): ``torch.mm`` FLOP/s on 2048 x
2048 fp32 matrices (``mm_gflops``); the matmul floor of a step is its FLOPs at that rate
(``floor_ms``), ``x_floor`` is ms/step over it, and CPU MFU is achieved FLOP/s over the same rate.
``gemm_ms`` is the time per step inside the GEMMs alone (two more steps under ``torch.profiler``) and
``gemm_x_floor`` that over ``floor_ms``: the part of ``x_floor`` that no fusion of the other ops can remove.
``--activation-checkpointing`` trains with it on (peak memory is the column to compare on a GPU).
Writes a CSV, a Markdown table and a PNG bar chart under bench/results/ (or --out).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from bench.common import environment, markdown_table, report_row, save_figure, write_results  # noqa: E402
from llm.train.flops import PEAK_BF16_TFLOPS, flops_per_token, peak_tflops  # noqa: E402,F401
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.train.optim import configure_optimizer  # noqa: E402

PROVIDERS = ("reference", "pytorch", "pytorch+compile", "triton", "triton+compile", "cuda", "cuda+compile", "auto")
DEFAULT_PROVIDERS = ("reference", "pytorch+compile", "triton", "triton+compile", "cuda", "cuda+compile")
CPU_PROVIDERS = ("reference", "pytorch", "cuda", "auto")

def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` fp32 ``torch.mm`` GFLOP/s on ``n`` x ``n`` matrices: the CPU's practical ceiling."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profiled_gemm_ms(step, steps: int = 2) -> float:
    """Mean ms per step spent inside the matrix multiplies themselves (CPU): ``steps`` more steps under
    ``torch.profiler``, summing the self time of :data:`GEMM_OPS`.  Over ``floor_ms`` it says how far
    the GEMMs alone are from the 2048 x 2048 rate at the step's own shapes, cache and memory traffic."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS)
    return us / 1e3 / steps


def skip_reason(provider: str, device: torch.device) -> str | None:
    backend = {"reference": "torch"}.get(provider, provider.split("+")[0])
    report = kernels.available_backends(device)
    if backend != "auto" and report.get(backend):
        return report[backend]
    if provider.endswith("+compile") and device.type != "cuda":
        return "torch.compile is measured on a GPU only (on the CPU it compiles for minutes and measures little)"
    return None


def run_provider(provider: str, preset: str, args, device: torch.device) -> dict:
    """Train ``args.warmup + args.steps`` steps; time the last ``args.steps``."""
    backend = {"reference": "torch"}.get(provider, provider.split("+")[0])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, block_size=args.block_size)).to(device)
    model.activation_checkpointing = args.activation_checkpointing
    fpt = flops_per_token(model, args.block_size)
    optimizer = configure_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device_type=device.type)
    step_model = torch.compile(model) if provider.endswith("+compile") else model
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch_size, args.block_size + 1), generator=g)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)  # (B, T) each
    use_bf16 = args.dtype == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    with kernels.backend(backend):
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        final_loss = loss.item()  # synchronizes
        seconds = time.perf_counter() - start
    ms = seconds / args.steps * 1e3
    gemm_ms = None
    if device.type == "cpu":
        with kernels.backend(backend):
            gemm_ms = profiled_gemm_ms(step)
    tok_s = args.batch_size * args.block_size * args.steps / seconds
    peak = peak_tflops(device) or (args.mm_gflops / 1e3 if args.mm_gflops else None)  # TFLOP/s
    floor_ms = 1e3 * args.batch_size * args.block_size * fpt / (args.mm_gflops * 1e9) if args.mm_gflops else None
    return {
        "ms_step": ms,
        "tok_s": tok_s,
        "mfu_pct": 100 * tok_s * fpt / (peak * 1e12) if peak else "-",
        "floor_ms": floor_ms if floor_ms else "-",
        "x_floor": ms / floor_ms if floor_ms else "-",
        "mm_gflops": args.mm_gflops or "-",
        "gemm_ms": gemm_ms if gemm_ms is not None else "-",
        "gemm_x_floor": gemm_ms / floor_ms if gemm_ms is not None and floor_ms else "-",
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else "-",
        "loss": final_loss,
        "params_m": model.num_parameters() / 1e6,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in rows}, key=[r["preset"] for r in rows].index)
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        got = [r for r in rows if r["preset"] == preset and r["tok_s"] != "-"]
        ax.barh([r["provider"] for r in got], [r["tok_s"] / 1e3 for r in got], color="tab:blue")
        for i, r in enumerate(got):
            note = f" {r['mfu_pct']:.0f}% MFU" if r["mfu_pct"] != "-" else ""
            ax.text(r["tok_s"] / 1e3, i, f" {r['tok_s'] / 1e3:.1f}k{note}", va="center", fontsize=8)
        ax.set_xlabel("thousand tokens / s (higher is better)")
        ax.set_title(preset)
        ax.invert_yaxis()
        ax.margins(x=0.3)
    save_figure(fig, path, title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized smoke run: tiny preset, T=32, fp32, 2 steps")
    p.add_argument("--presets", nargs="+", default=None, help="model presets (default gpt2 gpt2-medium; quick: tiny)")
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS, help=f"default: {' '.join(DEFAULT_PROVIDERS)}")
    p.add_argument("--block-size", type=int, default=None, help="T (default 1024; quick: 32)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; quick: 1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick, cpu = args.quick, device.type == "cpu" and not args.quick
    args.presets = args.presets or (["tiny"] if quick else ["cpu-small", "gpt2"] if cpu else ["gpt2", "gpt2-medium"])
    args.providers = args.providers or (["reference", "pytorch"] if quick else list(CPU_PROVIDERS) if cpu
                                        else list(DEFAULT_PROVIDERS))
    args.block_size = args.block_size or (32 if quick else 64 if cpu else 1024)
    args.batch_size = args.batch_size or (2 if quick else 4 if cpu else 16)
    args.steps = args.steps or (2 if quick else 5 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 4 if cpu else 5)
    if device.type == "cpu":
        from llm.train import train_setup

        train_setup.keep_freed_memory()  # as llm pretrain does on a CPU
    args.mm_gflops = None  # measured before each provider on a CPU
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    env = environment()
    peak = peak_tflops(device)
    env.update(dtype=args.dtype, batch=f"{args.batch_size} x {args.block_size} tokens",
               steps=f"{args.warmup} warm-up + {args.steps} timed",
               peak=f"{peak} TFLOP/s dense bf16" if peak else
               "torch.mm fp32 GFLOP/s, measured before each provider (mm_gflops)" if device.type == "cpu" else
               "unknown (MFU not reported)",
               activation_checkpointing=str(args.activation_checkpointing))
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    rows = []
    for preset in args.presets:
        for provider in args.providers:
            row = {"preset": preset, "provider": provider}
            reason = skip_reason(provider, device)
            if reason:
                print(f"skip {provider} ({preset}): {reason}")
                row.update(ms_step="-", tok_s="-", mfu_pct="-", floor_ms="-", x_floor="-", peak_mem_gb="-", loss="-",
                           note=reason[:100])
            else:
                try:
                    if device.type == "cpu":
                        args.mm_gflops = matmul_gflops(device)
                    row.update(run_provider(provider, preset, args, device))
                except (RuntimeError, torch.OutOfMemoryError, kernels.BackendUnavailableError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    print(f"failed {provider} ({preset}): {first}")
                    row.update(ms_step="-", tok_s="-", mfu_pct="-", floor_ms="-", x_floor="-", peak_mem_gb="-",
                               loss="-", note=first[:100])
            report_row(rows, row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()  # each compiled provider starts from a clean cache
    columns = ["preset", "provider", "ms_step", "tok_s", "mfu_pct", "floor_ms", "x_floor", "mm_gflops", "gemm_ms",
               "gemm_x_floor", "peak_mem_gb", "loss", "params_m", "note"]
    print(markdown_table(rows, columns))
    stem = write_results("train", rows, columns, env, args.out)
    if any(r["tok_s"] != "-" for r in rows):
        plot(rows, stem.with_suffix(".png"), f"GPT training throughput, {env['device']}, {env['commit']}")
    print(f"wrote {stem}.csv, .md" + (", .png" if stem.with_suffix(".png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
