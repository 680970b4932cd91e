"""Smoke runs of the benchmark scripts on CPU-sized shapes, so they never rot.

These check that every provider that can run here produced a number and the files were written;
speed itself is measured by running the scripts, never in a timed test.
"""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_benchmark_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/attention.py", "--quick", "--reps", "1", "--seqlens", "33", "--dims", "16", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (csv_path,) = tmp_path.glob("attention_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    measured = {(r["provider"], r["mode"]) for r in rows if r["tflops"] not in ("", "-")}
    for provider in ("reference", "sdpa-math"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert (provider, mode) in measured, f"{provider} {mode} not measured: {rows}"
    assert all(float(r["tflops"]) > 0 for r in rows if r["tflops"] not in ("", "-"))
    assert (tmp_path / csv_path.with_suffix(".png").name).stat().st_size > 0
    assert "skip cuda:" in result.stdout  # the unbuilt extension is reported, not silently dropped
