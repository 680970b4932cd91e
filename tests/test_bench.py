"""Smoke runs of the benchmark scripts on CPU-sized shapes, so they never rot.

These check that every provider that can run here produced a number and the files were written;
speed itself is measured by running the scripts, never in a timed test.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_attention_benchmark_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/attention.py", "--quick", "--reps", "1", "--warmup", "0", "--seqlens", "33", "--dims", "16", "--out", str(tmp_path)],
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
    # The extension's attention runs on CPU tensors too: measured when built, reported when not.
    from kernels.backends import unavailable_reason

    if unavailable_reason("cuda", "causal_attention", torch.device("cpu")) is None:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert ("cuda", mode) in measured, f"cuda {mode} not measured: {rows}"
    else:
        assert "skip cuda:" in result.stdout  # the unbuilt extension is reported, not silently dropped


def _run_quick(script, *args, tmp_path):
    """Run a benchmark script on CPU-sized shapes; Triton runs in its interpreter without a GPU."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, script, "--quick", "--reps", "1", "--warmup", "0", "--out", str(tmp_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _measured(rows, metric):
    return {tuple(r[k] for k in ("op", "provider", "mode") if k in r): float(r[metric]) for r in rows if r[metric] not in ("", "-")}


def test_layernorm_benchmark_quick(tmp_path):
    result = _run_quick(
        "bench/layernorm.py", "--widths", "100", "--rows", "16",
        "--providers", "triton", "cuda", "add-ln-triton", "add-ln-cuda", "reference", "F.layer_norm", tmp_path=tmp_path,
    )
    (csv_path,) = tmp_path.glob("layernorm_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    measured = _measured(rows, "gbps")
    for provider in ("triton", "add-ln-triton", "reference", "F.layer_norm"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert measured.get((provider, mode), 0) > 0, f"{provider} {mode} not measured: {rows}"
    assert all(float(r["pct_copy"]) > 0 and float(r["copy_gbps"]) > 0 for r in rows if r["gbps"] not in ("", "-"))
    assert "copy:" in result.stdout
    assert (tmp_path / csv_path.with_suffix(".png").name).stat().st_size > 0
    assert csv_path.with_suffix(".md").read_text().startswith("# layernorm")
    # The extension's LayerNorm runs on CPU tensors too: measured when built, reported when not.
    from kernels.backends import unavailable_reason

    if unavailable_reason("cuda", "layer_norm", torch.device("cpu")) is None:
        assert measured.get(("cuda", "fwd+bwd"), 0) > 0, f"cuda not measured: {rows}"
        assert measured.get(("add-ln-cuda", "fwd+bwd"), 0) > 0, f"add-ln-cuda not measured: {rows}"
    else:
        assert "skip cuda:" in result.stdout and "skip add-ln-cuda:" in result.stdout


def test_rmsnorm_benchmark_quick(tmp_path):
    result = _run_quick(
        "bench/rmsnorm.py", "--widths", "100", "--rows", "16",
        "--providers", "triton", "cuda", "add-rms-triton", "add-rms-cuda", "reference", "F.rms_norm", tmp_path=tmp_path,
    )
    (csv_path,) = tmp_path.glob("rmsnorm_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    measured = _measured(rows, "gbps")
    for provider in ("triton", "add-rms-triton", "reference", "F.rms_norm"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert measured.get((provider, mode), 0) > 0, f"{provider} {mode} not measured: {rows}"
    assert all(float(r["pct_copy"]) > 0 and float(r["copy_gbps"]) > 0 for r in rows if r["gbps"] not in ("", "-"))
    assert "copy:" in result.stdout
    assert (tmp_path / csv_path.with_suffix(".png").name).stat().st_size > 0
    assert csv_path.with_suffix(".md").read_text().startswith("# rmsnorm")
    # The extension's RMSNorm runs on CPU tensors too: measured when built, reported when not.
    from kernels.backends import unavailable_reason

    if unavailable_reason("cuda", "rms_norm", torch.device("cpu")) is None:
        assert measured.get(("cuda", "fwd+bwd"), 0) > 0, f"cuda not measured: {rows}"
        assert measured.get(("add-rms-cuda", "fwd+bwd"), 0) > 0, f"add-rms-cuda not measured: {rows}"
    else:
        assert "skip cuda:" in result.stdout and "skip add-rms-cuda:" in result.stdout


def test_cross_entropy_benchmark_quick(tmp_path):
    result = _run_quick(
        "bench/cross_entropy.py", "--tokens", "4", "--vocab", "100", "--hidden", "16",
        "--providers", "triton", "cuda", "reference", "F.cross_entropy", tmp_path=tmp_path,
    )
    (csv_path,) = tmp_path.glob("cross_entropy_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    gbps, tflops = _measured(rows, "gbps"), _measured(rows, "tflops")
    for provider in ("triton", "reference", "F.cross_entropy"):
        for mode in ("fwd", "fwd+bwd"):
            assert gbps.get(("ce", provider, mode), 0) > 0, f"ce {provider} {mode} not measured: {rows}"
            assert tflops.get(("linear-ce", provider, mode), 0) > 0, f"linear-ce {provider} {mode} not measured: {rows}"
    assert (tmp_path / csv_path.with_suffix(".png").name).stat().st_size > 0
    assert csv_path.with_suffix(".md").read_text().startswith("# cross_entropy")
    # The extension's loss ops run on CPU tensors too: measured when built, reported when not.
    from kernels.backends import unavailable_reason

    if unavailable_reason("cuda", "cross_entropy", torch.device("cpu")) is None:
        for mode in ("fwd", "fwd+bwd"):
            assert gbps.get(("ce", "cuda", mode), 0) > 0, f"ce cuda {mode} not measured: {rows}"
            assert tflops.get(("linear-ce", "cuda", mode), 0) > 0, f"linear-ce cuda {mode} not measured: {rows}"
    else:
        assert "skip cuda:" in result.stdout


def test_rope_swiglu_benchmark_quick(tmp_path):
    result = _run_quick(
        "bench/rope_swiglu.py", "--rope-shapes", "1,2,5,16", "--swiglu-shapes", "4,24",
        "--providers", "triton", "cuda", "reference", "pytorch", tmp_path=tmp_path,
    )
    (csv_path,) = tmp_path.glob("rope_swiglu_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    measured = _measured(rows, "gbps")
    for op in ("rope", "swiglu"):
        for provider in ("triton", "reference", "pytorch"):
            for mode in ("fwd", "fwd+bwd"):
                assert measured.get((op, provider, mode), 0) > 0, f"{op} {provider} {mode} not measured: {rows}"
    assert all(float(r["pct_copy"]) > 0 for r in rows if r["gbps"] not in ("", "-"))
    assert "copy:" in result.stdout
    assert (tmp_path / csv_path.with_suffix(".png").name).stat().st_size > 0
    assert csv_path.with_suffix(".md").read_text().startswith("# rope_swiglu")
    # The extension's ops run on CPU tensors too: measured when built, reported when not.
    from kernels.backends import unavailable_reason

    if unavailable_reason("cuda", "rope", torch.device("cpu")) is None:
        for op in ("rope", "swiglu"):
            assert measured.get((op, "cuda", "fwd+bwd"), 0) > 0, f"{op} cuda not measured: {rows}"
    else:
        assert "skip rope cuda:" in result.stdout and "skip swiglu cuda:" in result.stdout


def test_train_benchmark_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/train.py", "--quick", "--steps", "2", "--warmup", "1", "--out", str(tmp_path),
         "--providers", "reference", "pytorch", "auto"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (csv_path,) = tmp_path.glob("train_*.csv")
    rows = {r["provider"]: r for r in csv.DictReader(csv_path.open())}
    assert set(rows) == {"reference", "pytorch", "auto"}
    sys.path.insert(0, str(ROOT))
    from bench.train import flops_per_token
    from llm.model import GPT, GPTConfig

    fpt = flops_per_token(GPT(GPTConfig.from_preset("tiny", block_size=32)), 32)
    for r in rows.values():
        assert float(r["tok_s"]) > 0 and float(r["ms_step"]) > 0
        # on the CPU: the matmul floor from torch.mm measured in the run, and MFU against the same rate
        assert float(r["x_floor"]) == pytest.approx(float(r["ms_step"]) / float(r["floor_ms"]), rel=1e-3)
        assert float(r["mfu_pct"]) == pytest.approx(100 / float(r["x_floor"]), rel=1e-3)
        # the floor is the step's FLOPs (tiny preset, B=2, T=32) at the torch.mm rate measured before it
        assert float(r["floor_ms"]) == pytest.approx(1e3 * 2 * 32 * fpt / (float(r["mm_gflops"]) * 1e9), rel=1e-3)
        # the GEMMs alone (profiled) are part of the step, and gemm_x_floor is their time over the floor
        assert 0 < float(r["gemm_ms"]) < float(r["ms_step"]) * 1.5
        assert float(r["gemm_x_floor"]) == pytest.approx(float(r["gemm_ms"]) / float(r["floor_ms"]), rel=1e-3)
    assert "torch.mm fp32 GFLOP/s, measured before each provider" in result.stdout
    # same seed, same batch, same steps, fp32: the two backends compute the same training run
    assert abs(float(rows["reference"]["loss"]) - float(rows["pytorch"]["loss"])) < 1e-3
    assert (tmp_path / csv_path.with_suffix(".png").name).stat().st_size > 0
    assert "| tiny | reference |" in result.stdout


def test_train_benchmark_flops_per_token_and_peaks():
    sys.path.insert(0, str(ROOT))
    from bench.train import flops_per_token, peak_tflops
    from llm.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_preset("gpt2"))
    # 6 * (124,439,808 parameters - 786,432 in the position table) + 6 * 12 layers * 1024 * 768
    assert flops_per_token(model, 1024) == 6 * 123_653_376 + 6 * 12 * 1024 * 768
    assert peak_tflops(torch.device("cpu")) is None


def test_convergence_benchmark_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/convergence.py", "--quick", "--steps", "4", "--no-progress", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (curves_path,) = tmp_path.glob("convergence_*_curves.csv")
    steps = list(csv.DictReader(curves_path.open()))
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]
    for r in steps:  # fp32 on the CPU: the PyTorch-native ops train the same model as the reference
        assert abs(float(r["pytorch"]) - float(r["torch"])) < 1e-4
    (summary_path,) = (p for p in tmp_path.glob("convergence_*.csv") if p != curves_path)
    summary = {r["backend"]: r for r in csv.DictReader(summary_path.open())}
    assert float(summary["pytorch"]["max_gap_2nd_half"]) < 1e-4
    assert next(tmp_path.glob("convergence_*.png")).stat().st_size > 0


def test_sandbox_benchmark_quick(tmp_path):
    result = subprocess.run([sys.executable, "bench/sandbox.py", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (csv_path,) = tmp_path.glob("sandbox_*.csv")
    rows = {r["provider"]: r for r in csv.DictReader(csv_path.open())}
    assert rows["bare"]["passed"] == rows["unsafe"]["passed"] == "20"
    from llm.eval.sandbox import sandbox_unavailable_reason

    if sandbox_unavailable_reason() is None:
        assert rows["bwrap"]["passed"] == "20" and float(rows["bwrap"]["median_ms"]) > 0
    else:
        assert "skip bwrap:" in result.stdout
