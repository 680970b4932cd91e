"""What every benchmark script shares: timing, the record of where it ran, and writing the results.

Timing on a GPU uses CUDA events around many repetitions after a warm-up, with the L2 cache flushed
between repetitions (a kernel timed on a warm cache looks faster than it runs in a model); on a CPU,
wall-clock ``perf_counter``.  Both report the median, which a stray slow repetition cannot move.
"""
from __future__ import annotations

import csv
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def on_backend(op: str, backend_name: str) -> Callable:
    """``kernels.<op>`` run under ``kernels.backend(backend_name)``: how every script times our kernels."""
    import kernels

    fn = getattr(kernels, op)

    def run(*args):
        with kernels.backend(backend_name):
            return fn(*args)

    return run


def cpu_name() -> str:
    """The CPU's model name and widest vector extension (what the C++ kernels' SIMD code runs on)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = next((f for f in ("avx512f", "avx2", "neon", "asimd") if f in flags), None)
    return f"{name}" + (f", {isa}" if isa else "")


def environment() -> dict[str, str]:
    """Where and with what a benchmark ran: recorded beside every result."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
        commit += "-dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
    }


def bench(fn: Callable[[], object], *, device: torch.device, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds per call of ``fn`` on ``device``."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)  # 256 MB > any L2
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def report_row(rows: list[dict], row: dict) -> None:
    """Keep a measured row and print it at once (``ROW {json}``): a run that is cut short (a time cap in
    bench/gpu_check.sh) still leaves every number it measured in its log."""
    rows.append(row)
    print("ROW " + json.dumps(row, default=str), flush=True)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], columns: list[str], env: dict[str, str], out_dir: Path | None) -> Path:
    """Write ``<name>_<date>_<device>_<commit>.csv`` and ``.md`` (env header + table); return the stem."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_tag = "".join(c if c.isalnum() else "-" for c in env["device"].split("(")[0].strip()).strip("-") or "device"
    stem = out_dir / f"{name}_{env['date']}_{device_tag}_{env['commit']}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    stem.with_suffix(".md").write_text(f"# {name}\n\n{header}\n\n{markdown_table(rows, columns)}\n")
    return stem


def save_figure(fig, path: Path, title: str) -> None:
    """Title, lay out, write as PNG and free a benchmark's matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
