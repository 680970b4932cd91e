"""HumanEval (Chen et al. 2021, the Codex paper): write a Python function from its docstring.

For every problem, ``n`` completions of the prompt (a signature and docstring) are sampled and cut
at the paper's stop sequences (the next top-level def/class/if/print/comment: the function is
over).  Each program -- prompt + completion + the problem's tests + ``check(entry_point)`` -- runs
in :mod:`llm.eval.sandbox`; it passes when it exits cleanly.  With ``c`` of ``n`` samples passing,
pass@k is estimated without bias as ``1 - C(n-c, k) / C(n, k)`` (the paper's estimator; ``k <= n``).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import generate_until, read_jsonl
from .sandbox import Limits, run_programs

__all__ = ["STOPS", "build_program", "check_completions", "evaluate_humaneval", "load_problems", "pass_at_k"]

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FIELDS = ("task_id", "prompt", "entry_point", "test")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn (without replacement) from n, of which c
    are correct, is correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, the Codex paper's numerically stable form
    (the binomials themselves overflow floats for n in the hundreds).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k must contain a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_problems(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval problems {task_id, prompt, entry_point, canonical_solution, test}; the pinned
    164-problem file by default (gzipped JSONL)."""
    if path is None:
        from ..data import fetch_dataset

        path = fetch_dataset("humaneval")
    problems = read_jsonl(path)
    for i, p in enumerate(problems):
        missing = [f for f in FIELDS if not isinstance(p.get(f), str)]
        if missing:
            raise ValueError(f"{path}, problem {i}: missing or non-string field(s) {missing}")
    return problems


def build_program(problem: dict, completion: str) -> str:
    """The program that tests one completion (as human-eval's execution.py assembles it)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_completions(problems: list[dict], completions: list[list[str]], limits: Limits = Limits(),
                      *, workers: int = 4, progress: bool = True) -> list[list[dict]]:
    """Run every completion of every problem; per problem a list of {status, reason, seconds}."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} lists of completions")
    programs, owners = [], []
    for i, (problem, samples) in enumerate(zip(problems, completions)):
        for completion in samples:
            programs.append(build_program(problem, completion))
            owners.append(i)
    outcomes = run_programs(programs, limits, workers=workers, progress=progress, desc="executing")
    results: list[list[dict]] = [[] for _ in problems]
    for i, outcome in zip(owners, outcomes):
        results[i].append({"status": outcome.status, "reason": outcome.reason, "seconds": round(outcome.seconds, 3)})
    return results


def sample_completions(model, tokenizer, problems: list[dict], *, n: int = 1, temperature: float = 0.0,
                       top_p: float | None = 0.95, max_new_tokens: int = 300, seed: int = 1234,
                       progress: bool = True) -> list[list[str]]:
    """``n`` completions per problem, each cut at the first stop sequence."""
    if n > 1 and temperature == 0:
        raise ValueError(f"{n} samples at temperature 0 would all be the same greedy completion; "
                         "set a temperature (the Codex paper uses 0.2 for pass@1, 0.8 for pass@100)")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for problem in tqdm(problems, desc="sampling", unit="problem", disable=not progress):
        out.append(generate_until(model, tokenizer, problem["prompt"], stops=STOPS, max_new_tokens=max_new_tokens,
                                  num_samples=n, temperature=temperature, top_p=top_p, generator=gen))
    return out


def evaluate_humaneval(
    model, tokenizer, problems: list[dict], *, n: int = 1, ks: tuple[int, ...] = (1,), temperature: float = 0.0,
    top_p: float | None = 0.95, max_new_tokens: int = 300, limits: Limits = Limits(), workers: int = 4,
    seed: int = 1234, canonical: bool = False, progress: bool = True,
) -> dict:
    """{"metrics": {pass@k for each k <= n, passed, samples, problems}, "items": per problem}.

    ``canonical=True`` checks the dataset's own solutions instead of sampling (a test of the
    sandbox and the data: all of them should pass); ``model`` may then be None.
    """
    if not problems:
        raise ValueError("no HumanEval problems to evaluate")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per problem ({n}); got k = {bad}")
    if canonical:
        completions = [[p["canonical_solution"]] * n for p in problems]
    else:
        completions = sample_completions(model, tokenizer, problems, n=n, temperature=temperature, top_p=top_p,
                                         max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    results = check_completions(problems, completions, limits, workers=workers, progress=progress)
    items, correct = [], []
    for problem, samples, outcomes in zip(problems, completions, results):
        c = sum(o["status"] == "passed" for o in outcomes)
        correct.append(c)
        items.append({"task_id": problem["task_id"], "passed": c, "samples": [
            {"completion": s, **o} for s, o in zip(samples, outcomes)]})
    metrics = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks}
    statuses = [o["status"] for outcomes in results for o in outcomes]
    metrics.update(problems=len(problems), samples=len(statuses), passed=statuses.count("passed"),
                   failed=statuses.count("failed"), timed_out=statuses.count("timed out"))
    return {"metrics": metrics, "items": items}
