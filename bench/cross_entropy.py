"""The loss: fused cross-entropy and the fused LM head + loss against PyTorch, side by side, in one run.

    python bench/cross_entropy.py            # GPU: bf16, N in {8192 .. 65536} tokens, V = 50257, H in {768, 1600}
    python bench/cross_entropy.py --quick    # CPU-sized smoke run (fp32, N = 8, V = 512, H = 64)

Two ops, each with these providers:

* ``ce`` (logits (N, V) -> mean loss): our backends that can run here ("triton", "cuda" through
  ``kernels.cross_entropy``), the pure-PyTorch reference, ``F.cross_entropy`` and
  ``torch.compile(F.cross_entropy)``.
* ``linear-ce`` (hidden (N, H), weight (V, H) -> mean loss): ours through
  ``kernels.linear_cross_entropy`` (never forms the logits), the reference, the unfused
  ``F.cross_entropy(hidden @ W.T, targets)`` on materialized logits ("F.cross_entropy"), and
  ``torch.compile`` of that unfused function ("compile").

A provider that cannot run is reported as skipped with the reason, never silently dropped.

Figures of merit.  ``ce`` is memory bound: GB/s under a fixed bytes model that charges every
provider the same traffic, the minimum a two-pass kernel needs (b = bytes per logit):
    fwd      read the logits once (max and sum of exp, online)          = N*V*b
    fwd+bwd  read them twice (lse, then softmax - onehot), write dlogits = 3*N*V*b
(targets and the per-row losses, N elements each, are left out).  A provider that moves more
(an unfused log_softmax writes and re-reads a full (N, V) tensor) shows up as fewer GB/s.
``linear-ce`` is matmul bound, so it is reported in TFLOP/s: fwd 2*N*H*V (the logits matmul),
fwd+bwd 6*N*H*V (plus dhidden = dlogits @ W and dW = dlogits^T @ hidden); its GB/s column is "-".
On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` during one call minus what was
allocated before it (inputs excluded; the logits of the unfused linear-CE included); on the CPU "-".

Writes a CSV, a Markdown table and a PNG (GB/s or TFLOP/s against N per provider) under
bench/results/ (or --out).
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

OPS = ("ce", "linear-ce")
MODES = ("fwd", "fwd+bwd")
CE_BYTES = {"fwd": 1, "fwd+bwd": 3}  # multiples of N*V*b
LCE_FLOPS = {"fwd": 2, "fwd+bwd": 6}  # multiples of N*H*V


def f_cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets)


def unfused_linear_cross_entropy(hidden, weight, targets):
    """The LM head as a model without a fused loss runs it: materialize the logits, then the loss."""
    return F.cross_entropy(hidden @ weight.t(), targets)


def compiled(fn, device: torch.device, dtype: torch.dtype, example):
    """``torch.compile(fn)``, or the reason it cannot compile here (e.g. no C++ compiler)."""
    try:
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one specialised graph per shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        cfn = torch.compile(fn, dynamic=False)
        args = example()
        torch.autograd.grad(cfn(*args), [a for a in args if a.requires_grad])  # compile now: fail as a skip
        return cfn
    except Exception as exc:  # noqa: BLE001 -- inductor fails in many ways (no compiler, no triton, ...)
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def providers(op: str, device: torch.device, dtype: torch.dtype, only: list[str] | None = None) -> dict:
    """name -> fn, or name -> the reason it cannot run."""
    api = "cross_entropy" if op == "ce" else "linear_cross_entropy"
    found: dict = {}
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, api, device)
        found[name] = on_backend("cross_entropy" if op == "ce" else "linear_cross_entropy", name) if reason is None else reason
    if op == "ce":
        found["reference"] = kernels.reference.cross_entropy
        found["F.cross_entropy"] = f_cross_entropy
        example = lambda: (torch.randn(4, 32, dtype=dtype, device=device, requires_grad=True),
                           torch.randint(0, 32, (4,), device=device))
        unfused = f_cross_entropy
    else:
        found["reference"] = kernels.reference.linear_cross_entropy
        found["F.cross_entropy"] = unfused_linear_cross_entropy
        example = lambda: (torch.randn(4, 16, dtype=dtype, device=device, requires_grad=True),
                           torch.randn(32, 16, dtype=dtype, device=device, requires_grad=True),
                           torch.randint(0, 32, (4,), device=device))
        unfused = unfused_linear_cross_entropy
    if only is None or "compile" in only:
        found["compile"] = compiled(unfused, device, dtype, example)
    if only is not None:
        found = {k: v for k, v in found.items() if k in only}
    return found


def make_inputs(op, N, V, H, dtype, device):
    targets = torch.randint(0, V, (N,), device=device)
    if op == "ce":
        return (torch.randn(N, V, dtype=dtype, device=device, requires_grad=True), targets)
    hidden = torch.randn(N, H, dtype=dtype, device=device, requires_grad=True)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    return (hidden, weight, targets)


def measure(fn, inputs, device, mode, reps, warmup) -> tuple[float, float | str]:
    """(median ms, peak MB of one call or "-" off CUDA); raises whatever the provider raises."""
    diff = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*inputs)
    else:
        def call():
            return torch.autograd.grad(fn(*inputs), diff)
    ms = bench(call, device=device, reps=reps, warmup=warmup)
    peak: float | str = "-"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        del result
    return ms, peak


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ce", None)] + [("linear-ce", H) for H in sorted({r["H"] for r in rows if r["op"] == "linear-ce"})]
    fig, axes = plt.subplots(len(panels), len(MODES), figsize=(5 * len(MODES), 3.6 * len(panels)), squeeze=False)
    for i, (op, H) in enumerate(panels):
        metric, unit = ("gbps", "GB/s") if op == "ce" else ("tflops", "TFLOP/s")
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and (H is None or r["H"] == H) and r["mode"] == mode
                   and isinstance(r[metric], float)]
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = [(r["N"], r[metric]) for r in sel if r["provider"] == prov]
                ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op}, {mode}" + (f", H={H}" if H else ""))
            ax.set_xlabel("tokens N")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if sel:
                ax.legend(fontsize=8)
    save_figure(fig, path, title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes (a smoke run)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 with --quick or on CPU")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts N (default 8192 16384 32768 65536; quick: 8)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size V (default 50257; quick: 512)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="model widths H for linear-ce (default 768 1600; quick: 64)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="which ops to measure")
    p.add_argument("--providers", nargs="+", default=None, help="run only these providers (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 20; quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 5; quick: 1)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES[args.dtype or ("fp32" if quick else "bf16")]
    tokens = args.tokens or ([8] if quick else [8192, 16384, 32768, 65536])
    V = args.vocab or (512 if quick else 50257)
    widths = args.hidden or ([64] if quick else [768, 1600])
    reps = args.reps or (2 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    elem = torch.empty((), dtype=dtype).element_size()

    env = environment()
    print(f"cross-entropy, {str(dtype).replace('torch.', '')}, N in {tokens}, V = {V}, H in {widths} (linear-ce)")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    rows = []
    for op in args.ops:
        for name, fn in providers(op, device, dtype, args.providers).items():
            if isinstance(fn, str):
                print(f"  skip {name}: {fn} [{op}]")
                continue
            for H in ([None] if op == "ce" else widths):
                for N in tokens:
                    for mode in MODES:
                        row = dict(op=op, provider=name, N=N, V=V, H=H if H else "-", mode=mode)
                        try:
                            inputs = make_inputs(op, N, V, H, dtype, device)
                            ms, peak = measure(fn, inputs, device, mode, reps, warmup)
                            row.update(ms=ms, peak_mb=peak)
                            if op == "ce":
                                row.update(gbps=CE_BYTES[mode] * N * V * elem / (ms * 1e-3) / 1e9, tflops="-")
                            else:
                                row.update(gbps="-", tflops=LCE_FLOPS[mode] * N * H * V / (ms * 1e-3) / 1e12)
                        except (RuntimeError, torch.OutOfMemoryError) as exc:  # unsupported shape, OOM
                            row.update(ms="-", gbps="-", tflops="-", peak_mb="-",
                                       note=str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__)
                        inputs = None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        report_row(rows, row)
    columns = ["op", "provider", "N", "V", "H", "mode", "ms", "gbps", "tflops", "peak_mb", "note"]
    print(markdown_table(rows, columns))
    stem = write_results("cross_entropy", rows, columns, env, args.out)
    plot(rows, stem.with_suffix(".png"), f"cross-entropy, {env['device']}, {env['commit']}")
    print(f"wrote {stem}.csv, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
