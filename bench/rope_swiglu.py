"""RoPE and SwiGLU memory bandwidth: every provider side by side, in one run.

    python bench/rope_swiglu.py            # GPU: bf16, the model's shapes (below)
    python bench/rope_swiglu.py --quick    # CPU-sized smoke run (fp32, tiny shapes)

Inputs are laid out as the model hands them over: RoPE turns q, a (B, H, T, D) transposed view of the
fused (B, T, 3, H, D) QKV projection, by cos/sin (T, D/2) float32; SwiGLU takes gate and up, the two
halves of one (M, 2I) projection.  Shapes: RoPE (B, H, T, D) in {(8, 32, 1024, 128) Llama-style,
(8, 12, 1024, 64) GPT-2 small, (64, 32, 1, 128) decoding}; SwiGLU (M, I) in {(8192, 2816),
(8192, 11008), (16384, 3072)}.

Providers: our backends that can run here ("triton", "cuda" through the kernels API), the pure-PyTorch
reference, "pytorch" (the pytorch backend's eager ops: Hugging Face's ``x * cos + rotate_half(x) * sin``
and ``F.silu(gate) * up``) and "compile" (``torch.compile`` of those same functions).  A provider that
cannot run is reported as skipped with the reason, never silently dropped.

Both ops are memory bound, so the figure of merit is achieved bandwidth, in GB/s and as a percentage
of a device-to-device copy measured in the same run (``y.copy_(x)``, bytes = 2 x size).  Bytes model
(b = bytes per element, N = elements of x or of gate; cos/sin, T*D*4 bytes, are left out), the minimum
traffic, charged to every provider alike:

    rope     fwd: read x, write y                        = 2*N*b
             fwd+bwd: + read dy, write dx                = 4*N*b
    swiglu   fwd: read gate, up, write y                 = 3*N*b
             fwd+bwd: + read gate, up, dy, write dg, du  = 8*N*b

Writes a CSV, a Markdown table and a PNG (GB/s per shape and provider) under bench/results/ (or --out).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from bench.common import DTYPES, bench, environment, markdown_table, on_backend, report_row, save_figure, write_results  # noqa: E402
from kernels import _pytorch_backend  # noqa: E402
from kernels.backends import unavailable_reason  # noqa: E402

MODES = ("fwd", "fwd+bwd")
OPS = ("rope", "swiglu")
BYTES_FACTOR = {"rope": {"fwd": 2, "fwd+bwd": 4}, "swiglu": {"fwd": 3, "fwd+bwd": 8}}  # multiples of N*b
ROPE_SHAPES = [(8, 32, 1024, 128), (8, 12, 1024, 64), (64, 32, 1, 128)]
SWIGLU_SHAPES = [(8192, 2816), (8192, 11008), (16384, 3072)]
QUICK_ROPE_SHAPES = [(1, 2, 16, 64)]
QUICK_SWIGLU_SHAPES = [(16, 96)]
EAGER = {"rope": _pytorch_backend.rope, "swiglu": _pytorch_backend.swiglu}


def compiled_provider(op: str, device: torch.device, dtype: torch.dtype):
    """``torch.compile`` of the pytorch backend's op, or the reason it cannot compile here."""
    try:
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one specialised graph per shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        fn = torch.compile(EAGER[op], dynamic=False)
        inputs = make_inputs(op, (1, 2, 4, 8) if op == "rope" else (4, 8), dtype, device)
        fn(*inputs).sum().backward()  # compile now, so a failure is a skip rather than a row of errors
        return fn
    except Exception as exc:  # noqa: BLE001 -- inductor fails in many ways (no compiler, no triton, ...)
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def providers(op: str, device: torch.device, dtype: torch.dtype, only: list[str] | None = None) -> dict:
    """name -> fn (called with the op's inputs), or name -> the reason it cannot run."""
    found: dict = {}
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, op, device)
        found[name] = on_backend(op, name) if reason is None else reason
    found["reference"] = getattr(kernels.reference, op)
    found["pytorch"] = on_backend(op, "pytorch")
    if only is None or "compile" in only:
        found["compile"] = compiled_provider(op, device, dtype)
    if only is not None:
        found = {k: v for k, v in found.items() if k in only}
    return found


def make_inputs(op: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    """The op's inputs as the model passes them (leaves that need grad where a gradient is taken)."""
    if op == "rope":
        B, H, T, D = shape
        qkv = torch.randn(B, T, 3, H, D, device=device).to(dtype)
        x = qkv[:, :, 0].transpose(1, 2).detach().requires_grad_()  # (B, H, T, D) strided view of the projection
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
        angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
        return x, angles.cos(), angles.sin()
    M, I = shape  # noqa: E741
    h = torch.randn(M, 2 * I, device=device).to(dtype)
    gate, up = (t.detach().requires_grad_() for t in h.chunk(2, dim=-1))  # (M, I) halves, row stride 2I
    return gate, up


def copy_bandwidth(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """GB/s of ``y.copy_(x)`` on ``n`` elements: 2 * size bytes (read x, write y)."""
    x = torch.randn(n, device=device).to(dtype)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device=device, reps=max(reps, 5))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def measure(op, fn, shape, dtype, device, mode, reps, warmup) -> float:
    """Median ms of one mode; raises whatever the provider raises for an unsupported shape."""
    inputs = make_inputs(op, shape, dtype, device)
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(*inputs), device=device, reps=reps, warmup=warmup)
    leaves = [t for t in inputs if t.requires_grad]
    grad = torch.randn_like(fn(*inputs))

    def fwd_bwd():
        return torch.autograd.grad(fn(*inputs), leaves, grad)

    return bench(fwd_bwd, device=device, reps=reps, warmup=warmup)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(len(ops), len(MODES), figsize=(6 * len(MODES), 3.8 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode and isinstance(r["gbps"], float)]
            shapes = list(dict.fromkeys(r["shape"] for r in rows if r["op"] == op))
            provs = list(dict.fromkeys(r["provider"] for r in sel))
            width = 0.8 / max(len(provs), 1)
            for k, prov in enumerate(provs):
                pts = {r["shape"]: r["gbps"] for r in sel if r["provider"] == prov}
                xs = [s + k * width for s, shape in enumerate(shapes) if shape in pts]
                ax.bar(xs, [pts[shape] for shape in shapes if shape in pts], width, label=prov)
            copy = next((r["copy_gbps"] for r in sel), None)
            if copy:
                ax.axhline(copy, color="gray", linestyle="--", linewidth=1, label="copy")
            ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], shapes, fontsize=7)
            ax.set_title(f"{op} {mode}")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, title)


def _shapes(text: list[str] | None, default: list[tuple], n: int) -> list[tuple]:
    if not text:
        return default
    shapes = [tuple(int(v) for v in s.split(",")) for s in text]
    bad = [s for s in shapes if len(s) != n]
    if bad:
        raise SystemExit(f"each shape needs {n} comma-separated sizes, got {bad}")
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes (a smoke run)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 with --quick or on CPU")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--rope-shapes", nargs="+", default=None, help="B,H,T,D each (default: the model's shapes; quick: 1,2,16,64)")
    p.add_argument("--swiglu-shapes", nargs="+", default=None, help="M,I each (default: the model's shapes; quick: 16,96)")
    p.add_argument("--copy-elements", type=int, default=None, help="buffer size of the copy-bandwidth yardstick (default: the largest input, at least 64M on GPU)")
    p.add_argument("--providers", nargs="+", default=None, help="run only these providers (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 20; quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 5; quick: 1)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES[args.dtype or ("fp32" if quick else "bf16")]
    shapes = {"rope": _shapes(args.rope_shapes, QUICK_ROPE_SHAPES if quick else ROPE_SHAPES, 4),
              "swiglu": _shapes(args.swiglu_shapes, QUICK_SWIGLU_SHAPES if quick else SWIGLU_SHAPES, 2)}
    reps = args.reps or (2 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)

    env = environment()
    print(f"rope and swiglu, {str(dtype).replace('torch.', '')}, " + "; ".join(f"{op} {shapes[op]}" for op in args.ops))
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    biggest = max(math.prod(s) for op in args.ops for s in shapes[op])
    copy_elems = args.copy_elements or (max(biggest, 2**26) if device.type == "cuda" else max(biggest, 2**20))
    copy_gbps = copy_bandwidth(device, dtype, copy_elems, reps)
    print(f"device-to-device copy: {copy_gbps:.1f} GB/s ({copy_elems:,} elements, bytes = 2 x size)")
    size = torch.empty((), dtype=dtype).element_size()
    rows = []
    for op in args.ops:
        for name, fn in providers(op, device, dtype, args.providers).items():
            if isinstance(fn, str):
                print(f"  skip {op} {name}: {fn}")
                continue
            for shape in shapes[op]:
                nbytes = math.prod(shape) * size
                for mode in MODES:
                    row = dict(op=op, provider=name, shape="x".join(map(str, shape)), mode=mode, copy_gbps=copy_gbps)
                    try:
                        ms = measure(op, fn, shape, dtype, device, mode, reps, warmup)
                        gbps = BYTES_FACTOR[op][mode] * nbytes / (ms * 1e-3) / 1e9
                        row.update(ms=ms, gbps=gbps, pct_copy=100.0 * gbps / copy_gbps)
                    except (RuntimeError, torch.OutOfMemoryError) as exc:  # unsupported shape, OOM
                        row.update(ms="-", gbps="-", pct_copy="-", note=str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    report_row(rows, row)
    columns = ["op", "provider", "shape", "mode", "ms", "gbps", "pct_copy", "copy_gbps", "note"]
    print(markdown_table(rows, columns))
    stem = write_results("rope_swiglu", rows, columns, env, args.out)
    plot(rows, stem.with_suffix(".png"), f"rope and swiglu, {env['device']}, {env['commit']}")
    print(f"wrote {stem}.csv, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
