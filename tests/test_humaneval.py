"""llm.eval.humaneval and llm.eval.sandbox: pass@k, the canonical solutions, and what the sandbox stops."""
import time
from math import comb

import pytest

from llm.eval.common import truncate_at_stops
from llm.eval.humaneval import (
    STOPS,
    build_program,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
)
from llm.eval.sandbox import Limits, network_namespace_available, run_program

FAST = Limits(timeout_s=5.0)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.mark.parametrize("n,c,k,want", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - comb(3, 2) / comb(5, 2)),  # 0.7
    (5, 0, 3, 0.0),
    (5, 3, 3, 1.0),  # n - c < k: every draw of 3 holds a correct one
    (5, 5, 1, 1.0),
    (200, 13, 10, 1 - comb(187, 10) / comb(200, 10)),
    (1, 1, 1, 1.0),
])
def test_pass_at_k(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, 2, 6), (5, 2, 0), (0, 0, 1)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def _check_canonical(problems):
    start = time.perf_counter()
    out = evaluate_humaneval(None, None, problems, canonical=True, limits=FAST, workers=4, progress=False)
    print(f"{len(problems)} canonical solutions in {time.perf_counter() - start:.1f} s")
    failed = [(it["task_id"], it["samples"][0]["reason"]) for it in out["items"] if it["passed"] != 1]
    assert failed == []
    assert out["metrics"]["pass@1"] == 1.0 and out["metrics"]["passed"] == len(problems)


@pytest.mark.slow  # 10-16 s on 2 shared cores (~0.1 s of process start-up per program)
def test_all_164_canonical_solutions_pass(problems):
    assert len(problems) == 164
    _check_canonical(problems)


def test_canonical_solutions_of_a_fixed_subset_pass(problems):
    _check_canonical(problems[::8])  # 21 problems spread over the set


def test_wrong_solutions_fail_and_pass_at_k_counts_them(problems, monkeypatch):
    subset = problems[:3]
    right = [p["canonical_solution"] for p in subset]
    samples = {"wrong": "    return None\n", "crash": "    raise ValueError('no idea')\n"}
    assert not run_program(build_program(subset[0], samples["wrong"]), FAST).passed
    outcome = run_program(build_program(subset[0], samples["crash"]), FAST)
    assert outcome.status == "failed" and outcome.reason == "ValueError: no idea"
    # n = 2 samples per problem: the canonical one passes, so pass@1 = 1/2 and pass@2 = 1 for each
    from llm.eval import humaneval

    monkeypatch.setattr(humaneval, "sample_completions", lambda *a, **k: [[r, samples["wrong"]] for r in right])
    out = evaluate_humaneval(object(), None, subset, n=2, ks=(1, 2), limits=FAST, progress=False)
    assert out["metrics"]["pass@1"] == pytest.approx(0.5) and out["metrics"]["pass@2"] == 1.0
    assert [s["status"] for s in out["items"][0]["samples"]] == ["passed", "failed"]
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluate_humaneval(None, None, subset, n=1, ks=(1, 5), canonical=True, progress=False)


def test_completions_are_cut_at_the_codex_stop_sequences():
    text = "    return x\n\ndef helper():\n    pass\n"
    assert truncate_at_stops(text, STOPS) == "    return x\n"
    assert truncate_at_stops("    # comment\n    return 1\n# trailing", STOPS) == "    # comment\n    return 1"
    assert truncate_at_stops("    return 1\nprint(f(2))", STOPS) == "    return 1"


def test_temperature_zero_with_several_samples_is_refused(problems):
    from llm.eval.humaneval import sample_completions

    with pytest.raises(ValueError, match="temperature 0"):
        sample_completions(None, None, problems[:1], n=3, temperature=0.0)


# ---- the sandbox ------------------------------------------------------------------------------


def test_an_infinite_loop_is_timed_out():
    start = time.perf_counter()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert outcome.status == "timed out" and "1 s" in outcome.reason
    assert time.perf_counter() - start < 5


def test_the_timeout_kills_the_whole_process_group():
    # posix.fork gets around the guard's os.fork; the process group does not get around killpg.
    program = "import posix, sys, time\npid = posix.fork()\nif pid:\n    print(pid, flush=True)\ntime.sleep(60)\n"
    outcome = run_program(program, Limits(timeout_s=1.0))
    assert outcome.status == "timed out"
    child = int(outcome.stdout.split()[0])
    for _ in range(50):  # the orphan is reaped by init shortly after it dies
        try:
            with open(f"/proc/{child}/status") as f:
                state = next(line for line in f if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            break
        if "Z" in state.split()[1]:
            break  # dead, waiting to be reaped
        time.sleep(0.1)
    else:
        pytest.fail(f"the forked child {child} survived the timeout")


@pytest.mark.parametrize("program", [
    "x = bytearray(10**11)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n",
])
def test_huge_allocations_fail_inside_the_sandbox(program):
    outcome = run_program(program, Limits(timeout_s=10.0, memory_bytes=256 << 20))
    assert outcome.status == "failed"
    assert "MemoryError" in outcome.reason or "killed" in outcome.reason


def test_writing_or_deleting_outside_the_sandbox_is_blocked(tmp_path):
    target, keep = tmp_path / "evil.txt", tmp_path / "keep.txt"
    keep.write_text("precious")
    for program in [f"open({str(target)!r}, 'w').write('x')",
                    f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                    f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))"]:
        outcome = run_program(program, FAST)
        assert outcome.status == "failed" and "PermissionError" in outcome.reason, outcome
    assert not target.exists()
    outcome = run_program(f"import os\nos.remove({str(keep)!r})", FAST)
    assert "PermissionError" in outcome.reason and keep.read_text() == "precious"
    # inside its own folder the program may write and read back
    assert run_program("open('note.txt', 'w').write('hi')\nassert open('note.txt').read() == 'hi'", FAST).passed


def test_the_parents_environment_does_not_leak(monkeypatch):
    monkeypatch.setenv("MY_SECRET", "x")
    outcome = run_program("import os\nprint(sorted(os.environ))\nassert 'MY_SECRET' not in os.environ", FAST)
    assert outcome.passed, outcome
    assert "MY_SECRET" not in outcome.stdout and "HOME" in outcome.stdout


def test_no_network():
    outcome = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", FAST)
    assert outcome.status == "failed" and "network access is not allowed" in outcome.reason
    outcome = run_program("import subprocess\nsubprocess.run(['true'])", FAST)
    assert "subprocess is not allowed" in outcome.reason


@pytest.mark.skipif(not network_namespace_available(), reason="unshare -rn does not work here")
def test_network_namespace_has_only_loopback():
    # _socket is below the guard: only the namespace stops this connection.
    program = ("import socket, _socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n"
               "s = _socket.socket()\ntry:\n    s.connect(('1.1.1.1', 80))\n"
               "except OSError as e:\n    print('blocked', e)\n")
    outcome = run_program(program, FAST)
    assert outcome.passed and outcome.stdout.startswith("blocked"), outcome


def test_output_is_capped_and_a_normal_program_still_runs():
    flood = "import sys\nsys.stdout.write('x' * 50_000_000)"
    outcome = run_program(flood, Limits(timeout_s=10.0, file_bytes=1_000_000))
    assert outcome.status == "failed" and "File too large" in outcome.reason
    outcome = run_program("import math\nprint(math.factorial(5))", FAST)
    assert outcome.passed and outcome.stdout == "120\n" and outcome.reason == ""
