"""Every Triton kernel compiled ahead of time for sm_90 (H100/H200) and sm_80 (A100), without a GPU.

One subprocess (TRITON_INTERPRET unset there, so the kernels are JIT functions, not interpreted ones)
runs ``python -m kernels.aot``: it captures every launch the host code makes for the shapes of
``kernels.aot.default_cases`` (attention T = 1024 and Tq = 1 decoding at every head-dim bucket, fp16,
bf16, fp32 with IEEE and TF32 dots, with as many k/v heads as query heads and grouped-query with groups
of 2, 4 and 8; LayerNorm 768/4096/16384 wide; cross-entropy at V = 50257), asks
the autotuner which configs survive its pruning, compiles each for both archs through the JIT's own
binder, and writes what ptxas and Triton report.  The tests here assert the rules on those records:
each kernel compiles, fits the arch's shared memory, never spills, launches within CUDA's grid limits
and, on Hopper, multiplies 16-bit tiles of 64+ rows with wgmma.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from kernels import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton-cache")  # this run's own cache: ptxas runs for every kernel
    cmd = [sys.executable, "-m", "kernels.aot", "--arch", *map(str, ARCHS), "--jobs", str(min(4, os.cpu_count() or 1)),
           "--json", str(out / "aot.json"), "--md", str(out / "aot.md")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    if not (out / "aot.json").exists():
        pytest.fail(f"kernels.aot wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads((out / "aot.json").read_text())
    data["stdout"] = proc.stdout
    return data


def _where(r):
    return f"{r['kernel']} sm_{r['arch']} [{r['case']}] {r['config']}"


def _ok(report):
    return [r for r in report["records"] if "error" not in r]


def test_every_launched_kernel_is_compiled_for_both_archs(report):
    expected = {name for _, name in report["meta"]["launched_kernels"]}
    for arch in ARCHS:
        compiled = {r["kernel"] for r in report["records"] if r["arch"] == arch}
        assert compiled == expected, f"sm_{arch}: missing {expected - compiled}, unexpected {compiled - expected}"


def test_the_cases_cover_the_required_shapes_and_dtypes(report):
    cases = {c for r in report["records"] for c in r["cases"]}
    for D in (64, 128, 16, 32, 80, 192, 256):
        for dtype in ("fp16", "bf16", "fp32", "fp32-tf32"):
            assert f"attention: train T=1024 D={D} {dtype}" in cases
            assert f"attention: decode Tq=1 Tk=1024 D={D} {dtype}" in cases
            for H, H_kv in aot.GQA_HEADS:  # groups 2, 4, 8
                assert f"attention: train H={H} H_kv={H_kv} T=1024 D={D} {dtype}" in cases
                assert f"attention: decode H={H} H_kv={H_kv} Tq=1 Tk=1024 D={D} {dtype}" in cases
    for C in (768, 4096, 16384):
        for dtype in ("fp16", "bf16", "fp32"):
            assert f"layer_norm: layer_norm C={C} {dtype}" in cases
            assert f"layer_norm: add_layer_norm C={C} {dtype}" in cases
    for dtype in ("fp16", "bf16", "fp32"):
        assert f"cross_entropy: N=16 V=50257 {dtype}" in cases
    for dtype in ("fp16", "bf16", "fp32"):  # RoPE and SwiGLU (kernels/fused_rope.py, fused_swiglu.py)
        for D in aot.ROPE_HEAD_DIMS:
            assert f"rope: train T=1024 D={D} {dtype}" in cases
        assert f"rope: decode B*H=256 T=1 D=128 {dtype}" in cases
        for I in aot.SWIGLU_WIDTHS:  # noqa: E741
            assert f"swiglu: fused M=1024 I={I} {dtype}" in cases
        assert f"swiglu: flat M=1024 I=3072 {dtype}" in cases
    for C in (768, 4096, 16384):  # RMSNorm (kernels/fused_rmsnorm.py), with fp32 weights beside 16-bit x too
        for dtype in ("fp16", "bf16", "fp32"):
            for op in ("rms_norm", "add_rms_norm"):
                assert f"rms_norm: {op} C={C} {dtype}" in cases
                if dtype != "fp32":
                    assert f"rms_norm: {op} C={C} weight fp32 {dtype}" in cases


def test_grouped_query_attention_compiles_its_own_dkdv_and_shares_the_rest(report):
    """GQA's dK/dV kernel (each program sums its k/v head's group of query heads) is a compiled variant
    of its own for every head-dim bucket, dtype and arch, one for all groups; the forward, dQ and
    preprocess kernels of a GQA launch are the very kernels the multi-head launch compiles."""
    dkdv = {(r["arch"], r["dtype"], r["constexprs"].get("BLOCK_D")) for r in report["records"]
            if r["kernel"] == "_bwd_dkdv_kernel" and r["constexprs"].get("GQA")}
    for arch in ARCHS:
        for dtype in ("fp16", "bf16", "fp32", "fp32-tf32"):
            for block_d in (16, 32, 64, 128, 256):
                assert (arch, dtype, block_d) in dkdv, f"no GQA dK/dV kernel for sm_{arch} {dtype} BLOCK_D={block_d}"
    for r in report["records"]:
        gqa = [c for c in r["cases"] if "H_kv=" in c]
        if gqa and r["kernel"] != "_bwd_dkdv_kernel":
            assert len(gqa) < len(r["cases"]), f"{_where(r)}: a GQA launch compiled a kernel no multi-head launch uses"
        if r["kernel"] == "_bwd_dkdv_kernel":  # and the two variants never mix
            assert not gqa or len(gqa) == len(r["cases"]), _where(r)


def test_every_kept_config_compiles(report):
    errors = [f"{_where(r)}: {r['error']}" for r in report["records"] if "error" in r]
    assert not errors, "\n".join(errors)


def test_shared_memory_fits_the_arch(report):
    over = [f"{_where(r)}: {r['shared']} B > {aot.SHARED_LIMIT[r['arch']]} B" for r in _ok(report)
            if r["shared"] > aot.SHARED_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)


def test_no_kept_config_spills(report):
    spills = [f"{_where(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads, {r['regs']} registers"
              for r in _ok(report) if r["spill_stores"] is None or r["spill_stores"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)


def test_grids_stay_within_cuda_limits(report):
    over = [f"{_where(r)}: grid {r['grid']}" for r in report["records"]
            if any(n > cap for n, cap in zip(r["grid"], aot.GRID_LIMIT))]
    assert not over, "\n".join(over)
    huge = [r for r in report["records"] if any("B*H=70000" in c for c in r["cases"]) and r["kernel"] == "_fwd_kernel"]
    assert huge and all(r["grid"][0] == 70_000 for r in huge), "B*H belongs on grid axis 0"


def test_hopper_multiplies_16_bit_tiles_with_wgmma(report):
    hopper = [r for r in _ok(report) if r["arch"] == 90]
    wrong = [f"{_where(r)}: {d['M']}x{d['N']} {d['a']} dot is {d['op']}" for r in hopper for d in r["dots"]
             if d["a"] in ("f16", "bf16") and d["M"] >= aot.WGMMA_MIN_M and d["op"] != "wgmma"]
    assert not wrong, "\n".join(wrong)
    # and the rule has something to bite on: the training kernels do have such dots
    assert any(d["op"] == "wgmma" for r in hopper for d in r["dots"])


def test_each_shape_keeps_a_config_for_gpus_with_less_shared_memory(report):
    """RTX 30xx/40xx, L4/L40 and sm_120 parts opt in to ~99 KB per block: each launch keeps one config that fits."""
    best: dict = {}
    for r in _ok(report):
        if r["arch"] == 80:
            for case in r["cases"]:
                key = (r["kernel"], case)
                best[key] = min(best.get(key, 1 << 30), r["shared"])
    too_big = [f"{k}: smallest kept config needs {v} B" for k, v in best.items() if v > aot.SMALL_GPU_SHARED]
    assert not too_big, "\n".join(too_big)


def test_the_command_reports_no_violations(report):
    assert aot.violations(report["records"]) == []
    assert report["stdout"].strip() == ""  # the command prints one line per violation
