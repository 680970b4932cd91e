"""RMSNorm memory bandwidth: every provider side by side, in one run.

    python bench/rmsnorm.py            # GPU: bf16, C in {1024, 2048, 3072, 4096, 8192}, M*C = 4M and 64M elements
    python bench/rmsnorm.py --quick    # CPU-sized smoke run (fp32, M = 64, C in {100, 768})

Providers: our backends that can run here ("triton", "cuda" through the kernels API), the
residual-fused ``kernels.add_rms_norm`` on each of them ("add-rms-triton", "add-rms-cuda"), the
pure-PyTorch reference, ``F.rms_norm`` and ``torch.compile(F.rms_norm)``.  A provider that cannot run
is reported as skipped with the reason, never silently dropped.

RMSNorm is memory bound, so the figure of merit is achieved bandwidth, reported in GB/s and as a
percentage of a device-to-device copy measured in the same run (``y.copy_(x)`` on a large buffer,
bytes = 2 x size).  Bytes model (b = bytes per element of x, M rows of width C; the weight, the 4M
bytes of rstd and the backward's small (P, C) fp32 partials are left out, so every provider is charged
the same minimum traffic):

    rms_norm      fwd: read x, write y                       = 2*M*C*b
                  bwd: read x, dy, write dx                  = 3*M*C*b
                  fwd+bwd                                    = 5*M*C*b
    add_rms_norm  fwd: read x, residual, write sum, y        = 4*M*C*b
                  bwd: read sum, dy, dsum, write dx          = 4*M*C*b
                  fwd+bwd                                    = 8*M*C*b

Writes a CSV, a Markdown table and a PNG (GB/s against width C per provider) under bench/results/
(or --out).  The timing, copy yardstick and plot are bench/layernorm.py's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from bench.common import DTYPES, bench, environment, markdown_table, on_backend, report_row, write_results  # noqa: E402
from bench.layernorm import MODES, copy_bandwidth, plot  # noqa: E402
from kernels.backends import unavailable_reason  # noqa: E402

BYTES_FACTOR = {  # multiples of M*C*b, see the module docstring
    "rms": {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
    "add-rms": {"fwd": 4, "bwd": 4, "fwd+bwd": 8},
}
EPS = 1e-6


def f_rms_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def reference_rms_norm(x, w):
    return kernels.reference.rms_norm(x, w, EPS)


def compiled_provider(device: torch.device, dtype: torch.dtype):
    """``torch.compile(F.rms_norm)``, or the reason it cannot compile here (e.g. no C++ compiler)."""
    try:
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one specialised graph per shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        fn = torch.compile(f_rms_norm, dynamic=False)
        x = torch.randn(4, 32, dtype=dtype, device=device, requires_grad=True)
        w = torch.ones(32, dtype=dtype, device=device, requires_grad=True)
        fn(x, w).sum().backward()  # compile now, so a failure is a skip rather than a row of errors
        return fn
    except Exception as exc:  # noqa: BLE001 -- inductor fails in many ways (no compiler, no triton, ...)
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def providers(device: torch.device, dtype: torch.dtype, only: list[str] | None = None) -> dict:
    """name -> (kind, fn) with kind "rms" or "add-rms", or name -> reason it cannot run."""
    found: dict = {}
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, "rms_norm", device)
        found[name] = ("rms", on_backend("rms_norm", name)) if reason is None else reason  # eps: the default, EPS
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, "add_rms_norm", device)
        found[f"add-rms-{name}"] = ("add-rms", on_backend("add_rms_norm", name)) if reason is None else reason
    found["reference"] = ("rms", reference_rms_norm)
    found["F.rms_norm"] = ("rms", f_rms_norm)
    if only is None or "compile" in only:
        compiled = compiled_provider(device, dtype)
        found["compile"] = ("rms", compiled) if callable(compiled) else compiled
    if only is not None:
        found = {k: v for k, v in found.items() if k in only}
    return found


def measure(kind, fn, M, C, dtype, device, mode, reps, warmup=5) -> float:
    """Median ms of one mode; raises whatever the provider raises for an unsupported shape."""
    x = torch.randn(M, C, dtype=dtype, device=device, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_()
    if kind == "add-rms":
        inputs = (x, torch.randn(M, C, dtype=dtype, device=device, requires_grad=True), w)
    else:
        inputs = (x, w)
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(*inputs), device=device, reps=reps, warmup=warmup)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = tuple(torch.randn_like(o) for o in outs)
    if mode == "bwd":
        return bench(lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True), device=device, reps=reps, warmup=warmup)

    def fwd_bwd():
        o = fn(*inputs)
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), inputs, grads)

    return bench(fwd_bwd, device=device, reps=reps, warmup=warmup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes (a smoke run)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 with --quick or on CPU")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="row widths C (default 1024 2048 3072 4096 8192; quick: 100 768)")
    p.add_argument("--elements", type=int, nargs="+", default=None, help="M*C per measurement, M = elements // C (default 4M 64M)")
    p.add_argument("--rows", type=int, default=None, help="fixed row count M instead of --elements (quick: 64)")
    p.add_argument("--copy-elements", type=int, default=None, help="buffer size of the copy-bandwidth yardstick (default: the largest M*C, at least 64M on GPU)")
    p.add_argument("--providers", nargs="+", default=None, help="run only these providers (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 20; quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 5; quick: 1)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES[args.dtype or ("fp32" if quick else "bf16")]
    widths = args.widths or ([100, 768] if quick else [1024, 2048, 3072, 4096, 8192])
    rows_fixed = args.rows or (64 if quick and not args.elements else None)
    sizes = [None] if rows_fixed else (args.elements or [2**22, 2**26])
    reps = args.reps or (2 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)

    env = environment()
    shape_desc = f"M = {rows_fixed}" if rows_fixed else "M*C = " + ", ".join(f"{s:,}" for s in sizes)
    print(f"rms_norm, {str(dtype).replace('torch.', '')}, C in {widths}, {shape_desc}")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    biggest = max(rows_fixed * C for C in widths) if rows_fixed else max(sizes)
    copy_elems = args.copy_elements or (max(biggest, 2**26) if device.type == "cuda" else max(biggest, 2**20))
    copy_gbps = copy_bandwidth(device, dtype, copy_elems, reps)
    print(f"device-to-device copy: {copy_gbps:.1f} GB/s ({copy_elems:,} elements, bytes = 2 x size)")
    rows = []
    for name, entry in providers(device, dtype, args.providers).items():
        if isinstance(entry, str):
            print(f"  skip {name}: {entry}")
            continue
        kind, fn = entry
        for size in sizes:
            for C in widths:
                M = rows_fixed or max(1, size // C)
                nbytes = M * C * torch.empty((), dtype=dtype).element_size()
                for mode in MODES:
                    row = dict(provider=name, elements=size or M * C, M=M, C=C, mode=mode, copy_gbps=copy_gbps)
                    try:
                        ms = measure(kind, fn, M, C, dtype, device, mode, reps, warmup)
                        gbps = BYTES_FACTOR[kind][mode] * nbytes / (ms * 1e-3) / 1e9
                        row.update(ms=ms, gbps=gbps, pct_copy=100.0 * gbps / copy_gbps)
                    except (RuntimeError, torch.OutOfMemoryError) as exc:  # unsupported shape, OOM
                        row.update(ms="-", gbps="-", pct_copy="-", note=str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    report_row(rows, row)
    columns = ["provider", "elements", "M", "C", "mode", "ms", "gbps", "pct_copy", "copy_gbps", "note"]
    print(markdown_table(rows, columns))
    stem = write_results("rmsnorm", rows, columns, env, args.out)
    plot(rows, stem.with_suffix(".png"), f"rms_norm, {env['device']}, {env['commit']}")
    print(f"wrote {stem}.csv, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
