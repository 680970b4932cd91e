"""The first 9 minutes on a GPU: one command that answers what CI cannot (run it as bench/gpu_check.sh).

    OUT=/path/to/results bash bench/gpu_check.sh     # on a GPU machine: ends by itself within 9 minutes
    bash bench/gpu_check.sh --dry-run --out DIR      # the same plan on a CPU, tiny shapes, short caps (CI)

The steps, in order.  Each has a wall-clock cap and is also cut to what is left of the budget (9 minutes
by default); a step that overruns is killed with its whole process group, so a hang costs at most its
cap, and the last 15 s are kept for the summary.  That is how the whole run fits its budget by
construction, whatever any step does:

  env        GPU, driver, nvcc, ninja, torch/triton versions, SM count; a missing nvcc or ninja is said
             at once (without nvcc the extension would build CPU-only and every CUDA test would fail;
             without ninja the build is serial and would eat the budget), and the build is skipped
  build      the C++/CUDA extension for this GPU's own arch only, MAX_JOBS=16, in the background, while
  triton     the Triton GPU tests run in several pytest processes at once (tests/test_lowp.py: forward
             and every gradient in fp16 and bf16 against the fp32 reference, within 2x PyTorch's own
             error; plus the gpu tests of tests/test_triton_*.py), so their compiles use every core
  cuda       the extension's GPU tests, once the build is done (tests/test_lowp.py, tests/test_cuda_*.py,
             tests/test_hostile_inputs.py: non-finite attention inputs on the CUDA kernels)
  bench      the GPU alone: attention (D 64/128, T 1024/4096, fwd and fwd+bwd, every SDPA backend),
             LayerNorm and add-LayerNorm at 768/4096 (F.layer_norm, torch.compile), cross-entropy and
             linear-CE at N = 16384, V = 50257 (time and peak memory), GPT-2 124M training, 10 timed
             steps per backend beside the compiled PyTorch-native baseline
  racecheck  compute-sanitizer --tool racecheck on the CUDA attention forward and backward, if time is left
             (a sanitizer that cannot attach to the device, as under gVisor, is reported as unavailable)

What lands in --out (default $OUT): gpu_check_<tag>.md (the summary: pass/fail per kernel x dtype x
direction with every failure's message, ours / PyTorch's best per op, the autotuner's choices),
gpu_check_<tag>.json (the same data) and gpu_check_<tag>_logs.tar.gz (every log, junit XML and
benchmark CSV/PNG), tag = date_GPU_commit: three files, within the device's limit of eight.
Exit status: 0 when every step ran and nothing failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Caps in seconds: (GPU run, dry run).  The budget cuts them further; see the module doc.
CAPS = {
    "env": (30, 60),
    "build": (300, 60),
    "triton": (240, 420),
    "cuda": (90, 240),
    "bench-attention": (90, 120),
    "bench-layernorm": (45, 120),
    "bench-cross_entropy": (45, 120),
    "bench-train": (110, 180),
    "racecheck": (60, 30),
}
BUDGET = (540, 1500)
SUMMARY_RESERVE = 15

TRITON_TESTS = ["tests/test_lowp.py", "tests/test_triton_attention.py", "tests/test_triton_layernorm.py",
                "tests/test_triton_cross_entropy.py", "tests/test_triton_model.py"]
CUDA_TESTS = ["tests/test_lowp.py", "tests/test_cuda_attention.py", "tests/test_cuda_cross_entropy.py",
              "tests/test_cuda_ext.py", "tests/test_hostile_inputs.py"]
TRITON_TESTS += ["tests/test_rms_norm.py"]  # RMSNorm: one file for both backends (its cuda cases are named so)
CUDA_TESTS += ["tests/test_rms_norm.py"]
TRITON_TESTS += ["tests/test_rope_swiglu.py"]  # RoPE and SwiGLU: every backend in one file (cuda cases named so)
CUDA_TESTS += ["tests/test_rope_swiglu.py"]

RACECHECK_SCRIPT = """
import torch, kernels
ops = torch.ops.llm_kernels
q, k, v, do = (torch.randn(1, 2, 200, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
out, lse = ops.attention_fwd(q, k, v, 0.125)
ops.attention_bwd(do, q, k, v, out, lse, 0.125)
q, k, v, do = (torch.randn(1, 1, 130, 128, device="cuda", dtype=torch.float16) for _ in range(4))
out, lse = ops.attention_fwd(q, k, v, 0.0884)
ops.attention_bwd(do, q, k, v, out, lse, 0.0884)
torch.cuda.synchronize()
print("attention forward and backward ran under the sanitizer")
"""


class Clock:
    def __init__(self, budget: float):
        self.start = time.monotonic()
        self.deadline = self.start + budget - SUMMARY_RESERVE

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Proc:
    """A command running in its own process group, its output going to a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict, cap: float, clock: Clock):
        self.name, self.cmd, self.log = name, cmd, log
        self.t0 = time.monotonic()
        self.until = self.t0 + max(0.0, min(cap, clock.left()))
        self.fh = open(log, "a")
        self.fh.write(f"$ {' '.join(cmd)}\n")
        self.fh.flush()
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def wait(self) -> dict:
        """Wait until it ends or its time is up (then kill its process group); return the outcome."""
        timed_out = False
        try:
            rc = self.p.wait(timeout=max(0.0, self.until - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = self.p.returncode
        seconds = round(time.monotonic() - self.t0, 1)
        self.fh.write(f"\n== {self.name}: {'killed at its cap' if timed_out else f'exit {rc}'} after {seconds} s\n")
        self.fh.close()
        status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
        return {"step": self.name, "status": status, "rc": rc, "seconds": seconds, "log": self.log.name}


def run(name, cmd, log, env, cap, clock) -> dict:
    if clock.left() <= 1:
        return {"step": name, "status": "skipped", "why": "no time left in the budget", "seconds": 0}
    return Proc(name, cmd, log, env, cap, clock).wait()


def skipped(name: str, why: str) -> dict:
    return {"step": name, "status": "skipped", "why": why, "seconds": 0}


# ------------------------------------------------------------------------------------------- steps


def step_env(work: Path, env: dict, dry: bool, clock: Clock) -> tuple[dict, dict]:
    """Facts about the machine; {"missing": [...]} names what the build would need and lacks."""
    log = work / "env.log"
    facts: dict = {"missing": []}
    with open(log, "w") as fh:
        for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,compute_cap",
                                            "--format=csv,noheader"]),
                           ("nvcc", ["--version"]), ("ninja", ["--version"]), ("compute-sanitizer", ["--version"])):
            path = shutil.which(tool)
            if path is None:
                facts[tool] = "not found"
                fh.write(f"{tool}: not found\n")
                if tool in ("nvcc", "ninja"):
                    facts["missing"].append(tool)
                continue
            try:
                out = subprocess.run([path, *args], capture_output=True, text=True, timeout=20)
                text = (out.stdout + out.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                text = f"failed: {exc}"
            facts[tool] = text.splitlines()[-1] if tool in ("nvcc", "compute-sanitizer") and text else text
            fh.write(f"$ {tool} {' '.join(args)}\n{text}\n")
    probe = ("import json, torch, numpy, os\n"
             "d = {'python': __import__('sys').version.split()[0], 'torch': torch.__version__,\n"
             "     'torch_cuda': torch.version.cuda, 'numpy': numpy.__version__, 'cpus': os.cpu_count()}\n"
             "try:\n    import triton; d['triton'] = triton.__version__\n"
             "except ImportError as e:\n    d['triton'] = f'not importable: {e}'\n"
             "if torch.cuda.is_available():\n"
             "    p = torch.cuda.get_device_properties(0)\n"
             "    d.update(gpu=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,\n"
             "             memory_gb=round(p.total_memory / 2**30, 1))\n"
             "print('FACTS ' + json.dumps(d))\n")
    result = run("env", [PY, "-c", probe], log, env, CAPS["env"][dry], clock)
    for line in log.read_text().splitlines():
        if line.startswith("FACTS "):
            facts.update(json.loads(line[6:]))
    if facts["missing"]:
        print(f"gpu_check: {' and '.join(facts['missing'])} not found: the extension is not built "
              "(without nvcc it would be CPU-only and every CUDA test would fail; without ninja the build "
              "is serial and would take the whole budget)", flush=True)
    result["facts"] = facts
    return result, facts


def start_build(work: Path, env: dict, dry: bool, facts: dict, clock: Clock):
    if dry:
        cmd = [PY, "-c", "import kernels._C; print('dry run: kernels._C (built by make install) imports')"]
        return Proc("build", cmd, work / "build.log", env, CAPS["build"][dry], clock)
    if facts["missing"]:
        return skipped("build", f"{' and '.join(facts['missing'])} not found")
    if "capability" not in facts:
        return skipped("build", "no CUDA device visible to torch")
    benv = {**env, "TORCH_CUDA_ARCH_LIST": facts["capability"], "MAX_JOBS": str(min(16, facts.get("cpus") or 16))}
    cmd = [PY, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps", "-v"]
    return Proc("build", cmd, work / "build.log", benv, CAPS["build"][dry], clock)


def collect(files: list[str], env: dict, log: Path, clock: Clock) -> tuple[list[str], str | None]:
    """The gpu tests' node ids, and why collecting failed (None when it did not)."""
    cmd = [PY, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, min(120, clock.left())))
    except subprocess.TimeoutExpired:
        return [], "collecting the tests timed out"
    log.write_text(out.stdout + out.stderr)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    return ids, (None if out.returncode in (0, 5) else f"pytest could not collect the tests (exit {out.returncode}): see {log.name}")


def _params(nodeid: str) -> list[str]:
    return nodeid.split("[", 1)[1].rstrip("]").split("-") if "[" in nodeid else []


def is_cuda_test(nodeid: str) -> bool:
    return "/test_cuda_" in nodeid or "cuda" in _params(nodeid)


def start_tests(step: str, nodeids: list[str], n_procs: int, work: Path, env: dict, cap: float, clock: Clock):
    """Split the tests round-robin over ``n_procs`` pytest processes (each file's tests spread out)."""
    buckets = [nodeids[i::n_procs] for i in range(n_procs)]
    procs = []
    for i, bucket in enumerate(b for b in buckets if b):
        cmd = [PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={work}/junit_{step}_{i}.xml", *bucket]
        procs.append(Proc(f"{step}[{i}]", cmd, work / f"{step}_{i}.log", env, cap, clock))
    return procs


def wait_all(step: str, procs: list, n_tests: int) -> dict:
    if not procs:
        return skipped(step, "no tests collected")
    results = [p.wait() for p in procs]
    worst = next((s for s in ("timeout", "failed") if any(r["status"] == s for r in results)), "ok")
    return {"step": step, "status": worst, "processes": results, "tests": n_tests,
            "seconds": max(r["seconds"] for r in results)}


def bench_commands(dry: bool, out: Path) -> list[tuple[str, list[str]]]:
    o = ["--out", str(out)]
    if dry:
        # Attention under Triton's interpreter takes 1-2 s a call on a 2-core AVX2 CPU: one length, one
        # timed rep, so that the dry run checks the script end to end within its cap.
        fewer = {"attention": ["--seqlens", "64", "--reps", "1", "--warmup", "1"]}
        return [(f"bench-{name}", [PY, f"bench/{name}.py", "--quick", *fewer.get(name, []), *o])
                for name in ("attention", "layernorm", "cross_entropy", "train")]
    return [
        ("bench-attention", [PY, "bench/attention.py", "--dims", "64", "128", "--seqlens", "1024", "4096",
                             "--modes", "fwd", "fwd+bwd", "--reps", "10", "--warmup", "3", "--providers", "triton",
                             "cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
                             "--gqa", "none", *o]),  # GQA shapes: their dK/dV autotuning would overrun the cap
        ("bench-layernorm", [PY, "bench/layernorm.py", "--widths", "768", "4096", "--elements", "67108864",
                             "--providers", "triton", "cuda", "add-ln-triton", "add-ln-cuda", "F.layer_norm", "compile",
                             "--reps", "10", *o]),
        ("bench-cross_entropy", [PY, "bench/cross_entropy.py", "--tokens", "16384", "--vocab", "50257",
                                 "--hidden", "768", "--reps", "5", *o]),
        ("bench-train", [PY, "bench/train.py", "--presets", "gpt2", "--providers", "pytorch+compile", "triton",
                         "cuda", "triton+compile", "--steps", "10", "--warmup", "3", *o]),
    ]


def step_racecheck(work: Path, env: dict, dry: bool, facts: dict, build: dict, clock: Clock) -> dict:
    if dry or "capability" not in facts:
        return skipped("racecheck", "no CUDA device" + (" (dry run)" if dry else ""))
    if shutil.which("compute-sanitizer") is None:
        return skipped("racecheck", "compute-sanitizer not found")
    if build.get("status") != "ok":
        return skipped("racecheck", "the extension was not built")
    if clock.left() < 30:
        return skipped("racecheck", f"only {clock.left():.0f} s left")
    cmd = ["compute-sanitizer", "--tool", "racecheck", "--kernel-name", "kns=_attn_", PY, "-c", RACECHECK_SCRIPT]
    result = run("racecheck", cmd, work / "racecheck.log", env, CAPS["racecheck"][dry], clock)
    return racecheck_outcome(result, (work / "racecheck.log").read_text())


def racecheck_outcome(result: dict, text: str) -> dict:
    """A race found fails the step; a sanitizer that could not run at all (no summary) is "unavailable"."""
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    result["hazards"] = m.group(0) if m else None
    if m and int(m.group(1)) > 0:
        result["status"] = "failed"
    elif not m and result["status"] == "failed":  # e.g. "Device not supported" under gVisor
        said = [ln for ln in text.splitlines() if "rror" in ln or "not supported" in ln]
        result.update(status="unavailable", why=(said[0].strip() if said else "no racecheck summary")[:200])
    return result


# ----------------------------------------------------------------------------------------- summary


def parse_junit(work: Path) -> dict:
    """Every test case: outcome, message, and the low-precision records (junit properties)."""
    cases, lowp = [], []
    for path in sorted(work.glob("junit_*.xml")):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue  # a process killed mid-write
        for tc in root.iter("testcase"):
            nodeid = f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (el.get("message") or el.text or "").strip()
                    break
            case, compared = None, 0
            for prop in tc.iter("property"):
                value = json.loads(prop.get("value"))
                if prop.get("name") == "lowp_case":
                    case = value
                elif prop.get("name") == "lowp":
                    lowp.append(value)
                    compared += 1
            if case is not None and not compared and outcome in ("failed", "error"):  # died before comparing
                lowp.append({**case, "direction": "?", "output": "-", "ok": False, "error": message[:300]})
            cases.append({"test": nodeid, "outcome": outcome, "message": message[:500], "case": case})
    return {"cases": cases, "lowp": lowp}


def lowp_table(records: list[dict]) -> list[dict]:
    """kernel x dtype x direction -> pass/fail with every failing output's numbers."""
    rows: dict = {}
    for r in records:
        directions = ("fwd", "bwd") if r["direction"] == "?" else (r["direction"],)
        for d in directions:
            row = rows.setdefault((r["kernel"], r["dtype"], d), {"kernel": r["kernel"], "dtype": r["dtype"],
                                                                 "direction": d, "checks": 0, "failures": []})
            row["checks"] += 1
            if not r["ok"]:
                row["failures"].append(r.get("error") or f"{r['output']}: ours {r['ours']:.3g} vs PyTorch {r['pytorch']:.3g} "
                                       f"(bound {r['bound']:.3g})")
    return [rows[k] for k in sorted(rows)]


def autotune_choices(work: Path) -> list[dict]:
    """The autotuner's picks, from TRITON_PRINT_AUTOTUNING's lines in every log."""
    pat = re.compile(r"Triton autotuning for function (\w+),\s*with key as (.*?),\s*finished after ([\d.]+)s,\s*"
                     r"best config selected: (.*?);", re.S)
    seen = {}
    for log in sorted(work.glob("*.log")):
        for fn, key, secs, cfg in pat.findall(log.read_text(errors="replace")):
            seen[(fn, key)] = {"kernel": fn, "key": key, "tuning_s": float(secs), "config": cfg.strip()}
    return list(seen.values())


def bench_rows(work: Path) -> dict[str, list[dict]]:
    out = {}
    for log in sorted(work.glob("bench-*.log")):
        rows = [json.loads(line[4:]) for line in log.read_text(errors="replace").splitlines() if line.startswith("ROW ")]
        out[log.stem.removeprefix("bench-")] = rows
    return out


def _num(v):
    return v if isinstance(v, (int, float)) else None


def ratios(bench: dict[str, list[dict]]) -> list[dict]:
    """Ours / PyTorch's best, per op and shape: > 1 means ours is faster."""
    out = []

    def best(rows, names, metric):
        vals = [_num(r.get(metric)) for r in rows if r["provider"] in names or any(r["provider"].startswith(n) for n in names)]
        vals = [v for v in vals if v]
        return max(vals) if vals else None

    def add(op, shape, ours_rows, theirs, metric, unit):
        for r in ours_rows:
            v = _num(r.get(metric))
            out.append({"op": op, "shape": shape, "ours": r["provider"], "value": v, "pytorch_best": theirs,
                        "unit": unit, "ratio": (v / theirs) if v and theirs else None})

    groups: dict = {}
    for r in bench.get("attention", []):  # "shape": multi-head ("mha") or a grouped-query preset
        groups.setdefault((r.get("shape") or "mha", r["D"], r["T"], r["mode"]), []).append(r)
    for (shape, D, T, mode), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "mha", kv[0])):
        label = f"D={D} T={T} {mode}" if shape == "mha" else f"{shape} D={D} T={T} {mode}"
        add("attention", label, [r for r in rows if r["provider"] in ("triton", "cuda")],
            best(rows, ("sdpa-",), "tflops"), "tflops", "TFLOP/s")
    groups = {}
    for r in bench.get("layernorm", []):
        groups.setdefault((r["C"], r["mode"]), []).append(r)
    for (C, mode), rows in sorted(groups.items()):
        theirs = best(rows, ("F.layer_norm", "compile"), "gbps")
        add("layer_norm", f"C={C} {mode}", [r for r in rows if r["provider"] in ("triton", "cuda")], theirs, "gbps", "GB/s")
        add("add_layer_norm", f"C={C} {mode}", [r for r in rows if r["provider"].startswith("add-ln-")], theirs, "gbps", "GB/s")
    groups = {}
    for r in bench.get("cross_entropy", []):
        groups.setdefault((r["op"], r["N"], r.get("H"), r["mode"]), []).append(r)
    for (op, N, H, mode), rows in sorted(groups.items(), key=str):
        metric = "gbps" if op == "ce" else "tflops"
        add(op, f"N={N} H={H} {mode}", [r for r in rows if r["provider"] in ("triton", "cuda")],
            best(rows, ("F.cross_entropy", "compile"), metric), metric, "GB/s" if op == "ce" else "TFLOP/s")
    train = bench.get("train", [])
    for preset in dict.fromkeys(r["preset"] for r in train):
        rows = [r for r in train if r["preset"] == preset]
        add("train", preset, [r for r in rows if r["provider"].split("+")[0] in ("triton", "cuda")],
            best(rows, ("pytorch",), "tok_s"), "tok_s", "tokens/s")
    return out


def markdown(report: dict) -> str:
    f = report["facts"]
    lines = [f"# GPU check {report['tag']}{' (DRY RUN on the CPU: tiny shapes, nothing here measures a GPU)' if report['dry_run'] else ''}",
             "",
             f"- GPU: {f.get('gpu', 'none')} (sm {f.get('capability', '-')}, {f.get('sms', '-')} SMs), driver: "
             f"{f.get('nvidia-smi', '-')}",
             f"- torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), triton {f.get('triton')}, numpy {f.get('numpy')}, "
             f"python {f.get('python')}, {f.get('cpus')} CPUs",
             f"- nvcc: {f.get('nvcc')}; ninja: {f.get('ninja')}; compute-sanitizer: {f.get('compute-sanitizer')}",
             f"- commit {report['commit']}, {report['date']}; wall time {report['seconds']} s of a {report['budget']} s budget",
             "", "## Steps", "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in report["steps"]:
        note = s.get("why") or s.get("hazards") or (f"{s['tests']} tests" if "tests" in s else "")
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '')} | {note} |")
    lines += ["", "## Correctness: ours against the fp32 reference, within 2x PyTorch's own error", "",
              "| kernel | dtype | direction | result | checks | failures |", "|---|---|---|---|---:|---|"]
    for r in report["lowp"]:
        result = "PASS" if not r["failures"] else "FAIL"
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['direction']} | {result} | {r['checks']} | "
                     f"{'; '.join(r['failures'])[:600]} |")
    cases = report["tests"]["cases"]
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    lines += ["", f"## Tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
              f"{counts['skipped']} skipped", ""]
    for c in cases:
        if c["outcome"] in ("failed", "error"):
            lines.append(f"- **{c['outcome']}** `{c['test']}`: {c['message'][:400]}")
    skips: dict = {}
    for c in cases:
        if c["outcome"] == "skipped":
            skips[c["message"][:160]] = skips.get(c["message"][:160], 0) + 1
    for msg, n in sorted(skips.items(), key=lambda kv: -kv[1]):
        lines.append(f"- skipped x{n}: {msg}")
    lines += ["", "## Speed: ours / PyTorch's best (> 1: ours is faster)", "",
              "| op | shape | ours | value | PyTorch's best | ratio |", "|---|---|---|---:|---:|---:|"]
    for r in report["ratios"]:
        def fmt(v):
            return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
        lines.append(f"| {r['op']} | {r['shape']} | {r['ours']} | {fmt(r['value'])} {r['unit']} | "
                     f"{fmt(r['pytorch_best'])} | {fmt(r['ratio'])} |")
    lines += ["", "## The autotuner's choices", "", "| kernel | key | config | tuning s |", "|---|---|---|---:|"]
    for a in report["autotune"]:
        lines.append(f"| {a['kernel']} | {a['key']} | {a['config']} | {a['tuning_s']} |")
    if not report["autotune"]:
        lines.append("| - | (none: no autotuned kernel ran) | | |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same plan on the CPU: tiny shapes, short caps")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="where the (at most 8) files go (default $OUT)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 540; dry run 1500)")
    p.add_argument("--procs", type=int, default=None, help="parallel pytest processes for the Triton tests")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("say where the results go: --out DIR or OUT=DIR")
    dry = args.dry_run
    budget = args.budget or BUDGET[dry]
    clock = Clock(budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_PRINT_AUTOTUNING": "1", "MPLBACKEND": "Agg"}
    if dry:  # the GPU tests' CPU variants, and the Triton kernels in the interpreter for the benchmarks too
        env.update(LLM_GPU_DRY_RUN="1", TRITON_INTERPRET="1")
    say = lambda msg: print(f"gpu_check [{clock.elapsed():5.0f} s] {msg}", flush=True)  # noqa: E731

    steps = []
    env_result, facts = step_env(work, env, dry, clock)
    steps.append(env_result)
    say(f"env: {facts.get('gpu', 'no GPU')}, torch {facts.get('torch')}, triton {facts.get('triton')}, "
        f"nvcc {'yes' if 'nvcc' not in facts['missing'] else 'MISSING'}, ninja {'yes' if 'ninja' not in facts['missing'] else 'MISSING'}")
    if not dry and "capability" not in facts:
        say("no CUDA device is visible: the GPU steps will skip (use --dry-run on a CPU)")

    build = start_build(work, env, dry, facts, clock)
    say("build: " + (build["why"] if isinstance(build, dict) else "started in the background"))
    nodeids, collect_error = collect(sorted(set(TRITON_TESTS + CUDA_TESTS)), env, work / "collect.log", clock)
    triton_ids = [n for n in nodeids if not is_cuda_test(n)]
    cuda_ids = [n for n in nodeids if is_cuda_test(n)]
    n_procs = args.procs or (2 if dry else max(1, min(8, (facts.get("cpus") or 2) // 2)))
    say(f"triton: {len(triton_ids)} tests in {n_procs} processes")
    procs = start_tests("triton", triton_ids, n_procs, work, env, CAPS["triton"][dry], clock)
    steps.append(wait_all("triton", procs, len(triton_ids)))
    if collect_error:
        steps[-1].update(status="failed", why=collect_error)
    say(f"triton: {steps[-1]['status']}")
    build_result = build if isinstance(build, dict) else build.wait()
    steps.append(build_result)
    say(f"build: {build_result['status']}")
    if build_result["status"] == "ok" or dry:
        procs = start_tests("cuda", cuda_ids, 1 if dry else 4, work, env, CAPS["cuda"][dry], clock)
        steps.append(wait_all("cuda", procs, len(cuda_ids)))
    else:
        steps.append(skipped("cuda", f"the build did not succeed ({build_result.get('why', build_result['status'])})"))
    say(f"cuda: {steps[-1]['status']}")
    bench_out = work / "bench"
    bench_out.mkdir()
    for name, cmd in bench_commands(dry, bench_out):
        if not dry and "capability" not in facts:
            steps.append(skipped(name, "no CUDA device"))
            continue
        steps.append(run(name, cmd, work / f"{name}.log", env, CAPS[name][dry], clock))
        say(f"{name}: {steps[-1]['status']}")
    steps.append(step_racecheck(work, env, dry, facts, build_result, clock))
    say(f"racecheck: {steps[-1]['status']}")

    tests = parse_junit(work)
    bench = bench_rows(work)
    gpu_tag = re.sub(r"[^A-Za-z0-9]+", "-", facts.get("gpu", "CPU-dry-run" if dry else "no-GPU")).strip("-")
    tag = f"{datetime.date.today().isoformat()}_{gpu_tag}_{commit()}"
    report = {"tag": tag, "dry_run": dry, "date": datetime.date.today().isoformat(), "commit": commit(),
              "budget": budget, "seconds": round(clock.elapsed(), 1), "facts": facts, "steps": steps,
              "lowp": lowp_table(tests["lowp"]), "tests": tests, "ratios": ratios(bench), "bench": bench,
              "autotune": autotune_choices(work)}
    (out / f"gpu_check_{tag}.md").write_text(markdown(report))
    (out / f"gpu_check_{tag}.json").write_text(json.dumps(report, indent=1, default=str))
    with tarfile.open(out / f"gpu_check_{tag}_logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=f"gpu_check_{tag}_logs")
    shutil.rmtree(work, ignore_errors=True)
    bad = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
    failed_tests = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
    say(f"wrote {out}/gpu_check_{tag}.md, .json, _logs.tar.gz; "
        f"{len(failed_tests)} failed tests; steps not ok: {', '.join(bad) or 'none'}")
    return 1 if bad or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
