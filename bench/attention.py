"""Causal attention throughput: every provider side by side, in one run.

    python bench/attention.py            # GPU: bf16, D in {64, 128}, T = 512 .. 16384 at 16K tokens per batch
    python bench/attention.py --quick    # CPU-sized smoke run (what CI runs)
    python bench/attention.py --gqa qwen3 --dims   # only a grouped-query shape (an empty --dims: no MHA rows)

Providers: our backends that can run here ("triton", "cuda" through the kernels API -- on a GPU the
extension's fp16/bf16 tensor-core kernels for D in {64, 128}, on a CPU its C++ twin), the pure-PyTorch
reference, and ``F.scaled_dot_product_attention`` with each backend PyTorch offers on the device
(flash, efficient, cuDNN on a GPU; math everywhere).  A provider that cannot run a shape is reported
as skipped with the reason, never silently dropped.

FLOPs (causal, so half of the T x T matmuls is masked away): forward 2*B*H*T^2*D (two matmuls of
2*T^2*D each, halved); backward 2.5x the forward (five matmuls instead of two); fwd+bwd 3.5x.
The model width H*D is fixed at 2048 (so H = 2048 / D), as in the FlashAttention papers' benchmarks.

Grouped-query attention (``--gqa``, the "shape" column): the query and k/v head counts of real models,
Llama 3.2 1B (H = 32 query heads sharing H_kv = 8 k/v heads, D = 64) and Qwen3 (16 / 8, D = 128), at the
same T and tokens per batch; SDPA gets ``enable_gqa=True`` (an SDPA backend without GQA support shows
"-" and its error in that row).  FLOPs count the query heads (the work is that of MHA with H heads; only k/v
traffic shrinks): forward 2*B*H*T^2*D again.
Writes a CSV, a Markdown table and a PNG under bench/results/ (or --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from bench.common import DTYPES, bench, environment, markdown_table, on_backend, report_row, save_figure, write_results  # noqa: E402
from kernels.backends import unavailable_reason  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# name -> (H query heads, H_kv k/v heads, head dim D)
GQA_SHAPES = {
    "llama3.2-1b": (32, 8, 64),
    "qwen3": (16, 8, 128),
    "tiny-gqa": (4, 1, 16),  # --quick's (a CPU-sized multi-query case)
}


def sdpa_provider(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend_name.upper())

    def run(q, k, v):
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # k/v with fewer heads
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    return run


def providers(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    found = {}
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, "causal_attention", device)
        found[name] = on_backend("causal_attention", name) if reason is None else reason
    # The extension's CUDA kernels are fp16/bf16 tensor-core kernels (its CPU twin takes any float dtype);
    # a head dim other than 64/128 is reported per row by the backend's own error.
    if device.type == "cuda" and dtype in (torch.float32, torch.float64) and not isinstance(found["cuda"], str):
        found["cuda"] = f"the CUDA attention kernels take fp16/bf16, not {str(dtype).replace('torch.', '')}"
    found["reference"] = kernels.reference.causal_attention
    sdpa = ("flash_attention", "efficient_attention", "cudnn_attention", "math") if device.type == "cuda" else ("math",)
    for b in sdpa:
        found[f"sdpa-{b.split('_')[0]}"] = sdpa_provider(b)
    return found


def measure(fn, B, H, T, D, dtype, device, mode, reps, warmup, H_kv=None) -> float:
    """Median ms of one mode; raises whatever the provider raises for an unsupported shape.  H_kv < H:
    k and v have H_kv heads (grouped-query attention)."""
    q = torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(B, H_kv or H, T, D, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(q, k, v), device=device, reps=reps, warmup=warmup)
    out = fn(q, k, v)
    grad = torch.randn_like(out)
    if mode == "bwd":
        return bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), device=device, reps=reps, warmup=warmup)
    return bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad), device=device, reps=reps, warmup=warmup)


def plot(rows: list[dict], path: Path, title: str, modes=MODES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.get("shape", "mha"), r["D"]) for r in rows))  # one row of plots each
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(5 * len(modes), 3.6 * len(panels)), squeeze=False)
    for i, (shape, D) in enumerate(panels):
        first = next(r for r in rows if (r.get("shape", "mha"), r["D"]) == (shape, D))
        label = f"D={D}" if shape == "mha" else f"{shape} (H={first['H']}, H_kv={first['H_kv']}, D={D})"
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if (r.get("shape", "mha"), r["D"]) == (shape, D) and r["mode"] == mode
                   and isinstance(r["tflops"], float)]
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = [(r["T"], r["tflops"]) for r in sel if r["provider"] == prov]
                ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, {label}")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes (a smoke run)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--dims", type=int, nargs="*", default=None,
                   help="head dims D of the multi-head rows (default 64 128; quick: 16 32; none: no MHA rows)")
    p.add_argument("--gqa", nargs="+", default=None, choices=[*GQA_SHAPES, "none"],
                   help="grouped-query shapes to add (default llama3.2-1b qwen3; quick: tiny-gqa)")
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="sequence lengths T")
    p.add_argument("--tokens", type=int, default=None, help="B*T per batch (default 16384; quick: 256)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (autotuning, caches)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="what to time")
    p.add_argument("--providers", nargs="+", default=None, help="run only these providers (default: all)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    width = 64 if quick else 2048
    dims = args.dims if args.dims is not None else ([16, 32] if quick else [64, 128])
    gqa = args.gqa or (["tiny-gqa"] if quick else ["llama3.2-1b", "qwen3"])
    # (shape name, H, H_kv, D): the multi-head sweep at width H*D, then the grouped-query shapes
    shapes = [("mha", max(1, width // D), None, D) for D in dims]
    shapes += [(name, *GQA_SHAPES[name]) for name in gqa if name != "none"]
    seqlens = args.seqlens or ([64, 128] if quick else [512, 1024, 2048, 4096, 8192, 16384])
    tokens = args.tokens or (256 if quick else 16384)
    reps = args.reps or (3 if quick else 20)

    env = environment()
    print(f"causal attention, {str(dtype).replace('torch.', '')}, {tokens} tokens per batch, H*D = {width}"
          + "".join(f"; {n}: H={H}, H_kv={Hk}, D={D}" for n, H, Hk, D in shapes if Hk is not None))
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    rows = []
    for name, fn in providers(device, dtype).items():
        if args.providers and name not in args.providers:
            continue
        if isinstance(fn, str):
            print(f"  skip {name}: {fn}")
            continue
        for shape, H, H_kv, D in shapes:
            for T in seqlens:
                B = max(1, tokens // T)
                flops = 2.0 * B * H * T * T * D  # query heads: GQA does MHA's work on fewer k/v heads
                for mode in args.modes:
                    row = dict(provider=name, shape=shape, D=D, T=T, B=B, H=H, H_kv=H_kv or H, mode=mode)
                    try:
                        ms = measure(fn, B, H, T, D, dtype, device, mode, reps, args.warmup, H_kv)
                        row.update(ms=ms, tflops=FLOP_FACTOR[mode] * flops / (ms * 1e-3) / 1e12)
                    except (RuntimeError, torch.OutOfMemoryError) as exc:  # unsupported shape, OOM
                        row.update(ms="-", tflops="-", note=str(exc).splitlines()[0][:80])
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    report_row(rows, row)
    columns = ["provider", "shape", "D", "T", "B", "H", "H_kv", "mode", "ms", "tflops", "note"]
    print(markdown_table(rows, columns))
    stem = write_results("attention", rows, columns, env, args.out)
    plot(rows, stem.with_suffix(".png"), f"causal attention, {env['device']}, {env['commit']}", args.modes)
    print(f"wrote {stem}.csv, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
