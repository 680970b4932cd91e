"""What the HumanEval sandbox costs per program: bubblewrap beside the unsafe mode and a bare Python.

    python bench/sandbox.py            # 100 empty programs and HumanEval's 164 canonical solutions, one at a time
    python bench/sandbox.py --quick    # 20 empty programs (a smoke run)

Providers, each running the same programs one after the other (workers = 1, so the numbers are
latencies, not throughput):

* ``bare``    -- ``python -I -B -S program.py`` in a subprocess: no harness, no limits, no sandbox;
* ``unsafe``  -- ``Limits(sandbox="unsafe")``: the harness, rlimits, the Python guard and, where
  ``unshare -rn`` works, a network namespace;
* ``bwrap``   -- the default sandbox (``Limits()``): bubblewrap's namespaces, uid 65534, a tmpfs.

Reports the median and mean milliseconds per program and the sandbox's added cost over ``bare``.
Writes a CSV and a Markdown table under bench/results/ (or --out).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import environment, markdown_table, report_row, write_results  # noqa: E402
from llm.eval.sandbox import Limits, run_program, sandbox_unavailable_reason  # noqa: E402


def bare(program: str) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(program)
    try:
        return subprocess.run([sys.executable, "-I", "-B", "-S", f.name], capture_output=True).returncode == 0
    finally:
        Path(f.name).unlink()


def timed(run, programs: list[str]) -> tuple[list[float], int]:
    times, passed = [], 0
    for p in programs:
        start = time.perf_counter()
        passed += bool(run(p))
        times.append((time.perf_counter() - start) * 1e3)
    return times, passed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 empty programs only")
    p.add_argument("--empty", type=int, default=100, help="how many empty programs")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    suites = {"empty": ["pass\n"] * (20 if args.quick else args.empty)}
    if not args.quick:
        from llm.eval.humaneval import build_program, load_problems

        suites["humaneval-canonical"] = [build_program(q, q["canonical_solution"]) for q in load_problems()]
    providers = {"bare": bare, "unsafe": lambda prog: run_program(prog, Limits(sandbox="unsafe")).passed}
    why = sandbox_unavailable_reason()
    if why is None:
        providers["bwrap"] = lambda prog: run_program(prog, Limits()).passed
    else:
        print(f"  skip bwrap: {why}")
    env = environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    rows = []
    for suite, programs in suites.items():
        base = None
        for name, run in providers.items():
            run(programs[0])  # warm the page cache and the sandbox probe
            times, passed = timed(run, programs)
            median = statistics.median(times)
            base = median if name == "bare" else base
            report_row(rows, {"suite": suite, "provider": name, "programs": len(programs), "passed": passed,
                              "median_ms": median, "mean_ms": statistics.fmean(times),
                              "added_ms": median - base if base is not None else "-"})
    columns = ["suite", "provider", "programs", "passed", "median_ms", "mean_ms", "added_ms"]
    print(markdown_table(rows, columns))
    stem = write_results("sandbox", rows, columns, env, args.out)
    print(f"wrote {stem}.csv, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
