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
from llm.eval.sandbox import Limits, run_program

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


# ---- the sandbox (tests/test_sandbox.py tests it attack by attack) ---------------------------


@pytest.mark.parametrize("completion", ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n"])
def test_a_completion_that_exits_before_the_tests_does_not_pass(problems, completion, monkeypatch):
    """The Codex paper's harness counted these as passes (exit status 0): five problems, pass@1 = 0 here."""
    from llm.eval import humaneval

    subset = problems[:5]
    monkeypatch.setattr(humaneval, "sample_completions", lambda *a, **k: [[completion] for _ in subset])
    out = evaluate_humaneval(object(), None, subset, limits=FAST, progress=False)
    assert out["metrics"]["pass@1"] == 0.0 and out["metrics"]["failed"] == 5
    assert all("no completion token" in it["samples"][0]["reason"] for it in out["items"])
