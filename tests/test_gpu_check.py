"""bench/gpu_check.sh, the 9-minute GPU check: its time caps hold, its summary reads the tests' records,
and its whole plan runs end to end on the CPU (--dry-run: tiny shapes, the interpreter, the C++ twins)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import gpu_check  # noqa: E402

OPS = ("causal_attention", "layer_norm", "add_layer_norm", "cross_entropy", "linear_cross_entropy")


def test_a_step_that_hangs_is_killed_with_its_children_at_its_cap(tmp_path):
    clock = gpu_check.Clock(600)
    t0 = time.monotonic()
    marker = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 300 & echo $! > {marker}; wait"]
    result = gpu_check.run("hang", cmd, tmp_path / "hang.log", dict(os.environ), 2, clock)
    assert result["status"] == "timeout" and time.monotonic() - t0 < 15
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower(), \
        "the step's background child outlived it"
    assert "killed at its cap" in (tmp_path / "hang.log").read_text()


def test_the_budget_cuts_a_steps_cap(tmp_path):
    clock = gpu_check.Clock(gpu_check.SUMMARY_RESERVE + 2)  # 2 s left before the summary's reserve
    t0 = time.monotonic()
    result = gpu_check.run("long", ["sleep", "60"], tmp_path / "long.log", dict(os.environ), 60, clock)
    assert result["status"] == "timeout" and time.monotonic() - t0 < 10
    assert gpu_check.run("late", ["true"], tmp_path / "late.log", dict(os.environ), 60, clock)["status"] == "skipped"


def test_the_summary_table_reports_each_failure_under_its_kernel_dtype_and_direction(tmp_path):
    case = json.dumps({"kernel": "triton.layer_norm", "dtype": "bfloat16"})
    rec = lambda out, d, ok: json.dumps({"kernel": "triton.layer_norm", "dtype": "bfloat16", "direction": d,  # noqa: E731
                                         "output": out, "ours": 0.5 if not ok else 0.01, "pytorch": 0.02,
                                         "bound": 0.05, "ok": ok})
    (tmp_path / "junit_triton_0.xml").write_text(f"""<?xml version="1.0"?>
<testsuites><testsuite name="pytest">
 <testcase classname="tests.test_lowp" name="test_layer_norm[triton-768-bf16]">
  <properties><property name="lowp_case" value='{case}'/><property name="lowp" value='{rec("y", "fwd", True)}'/>
   <property name="lowp" value='{rec("dx", "bwd", False)}'/></properties>
  <failure message="triton.layer_norm bfloat16: dx: max error 0.5 &gt; 2 x PyTorch's 0.02"/>
 </testcase>
 <testcase classname="tests.test_lowp" name="test_layer_norm[triton-4096-bf16]">
  <properties><property name="lowp_case" value='{case}'/></properties>
  <error message="RuntimeError: out of resources"/>
 </testcase>
 <testcase classname="tests.test_lowp" name="test_layer_norm[cuda-768-bf16]"><skipped message="no extension"/></testcase>
</testsuite></testsuites>""")
    tests = gpu_check.parse_junit(tmp_path)
    assert [c["outcome"] for c in tests["cases"]] == ["failed", "error", "skipped"]
    table = {(r["direction"]): r for r in gpu_check.lowp_table(tests["lowp"])}
    assert table["fwd"]["failures"] == ["RuntimeError: out of resources"]  # the crash counts in both directions
    assert len(table["bwd"]["failures"]) == 2 and "dx: ours 0.5 vs PyTorch 0.02" in table["bwd"]["failures"][0]


def test_racecheck_hazards_fail_and_a_sanitizer_that_cannot_run_is_unavailable():
    clean = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    assert gpu_check.racecheck_outcome({"status": "ok"}, clean)["status"] == "ok"
    race = "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)\n"
    assert gpu_check.racecheck_outcome({"status": "failed"}, race)["status"] == "failed"
    gvisor = "========= Error: Device not supported\n========= Internal error 999\n"
    out = gpu_check.racecheck_outcome({"status": "failed"}, gvisor)
    assert out["status"] == "unavailable" and "Device not supported" in out["why"]


def test_ratios_compare_ours_with_pytorchs_best_provider():
    bench = {"attention": [
        {"provider": "triton", "D": 64, "T": 1024, "mode": "fwd", "tflops": 300.0},
        {"provider": "sdpa-flash", "D": 64, "T": 1024, "mode": "fwd", "tflops": 400.0},
        {"provider": "sdpa-math", "D": 64, "T": 1024, "mode": "fwd", "tflops": 50.0},
        {"provider": "reference", "D": 64, "T": 1024, "mode": "fwd", "tflops": 900.0},  # not PyTorch's op
    ], "train": [{"preset": "gpt2", "provider": "pytorch+compile", "tok_s": 1000.0},
                 {"preset": "gpt2", "provider": "triton+compile", "tok_s": 1100.0}]}
    rows = {(r["op"], r["ours"]): r for r in gpu_check.ratios(bench)}
    assert rows[("attention", "triton")]["ratio"] == pytest.approx(0.75)
    assert rows[("train", "triton+compile")]["ratio"] == pytest.approx(1.1)


@pytest.mark.slow
def test_the_dry_run_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and all(f.startswith("gpu_check_") for f in files), files  # the device returns <= 8
    report = json.loads(next(out.glob("*.json")).read_text())
    assert report["dry_run"] and report["seconds"] <= report["budget"]
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["env", "triton", "build", "cuda", "bench-attention", "bench-layernorm",
                           "bench-cross_entropy", "bench-train", "racecheck"]
    assert all(s["status"] == "ok" for name, s in steps.items() if name != "racecheck"), steps
    assert steps["racecheck"]["status"] == "skipped"
    # every op of both backends ran forward and backward in fp16 and passed the 2x rule; the C++ twins
    # also ran bf16, while the Triton interpreter's bf16 cases were skipped with the reason
    table = {(r["kernel"], r["dtype"], r["direction"]): r for r in report["lowp"]}
    for backend in ("triton", "cuda"):
        for op in OPS:
            for direction in ("fwd", "bwd"):
                row = table[(f"{backend}.{op}", "float16", direction)]
                assert row["checks"] > 0 and row["failures"] == [], row
            assert table[("cuda." + op, "bfloat16", "bwd")]["failures"] == []
    skips = [c["message"] for c in report["tests"]["cases"] if c["outcome"] == "skipped"]
    assert any("does not emulate bf16" in m for m in skips)
    assert {"attention", "layernorm", "cross_entropy", "train"} <= set(report["bench"])
    assert all(report["bench"][name] for name in ("attention", "layernorm", "cross_entropy", "train"))
    md = next(out.glob("*.md")).read_text()
    assert "DRY RUN" in md and "| triton.causal_attention | float16 | fwd | PASS |" in md
