"""Our GPT as a model of EleutherAI's lm-evaluation-harness, so its hundreds of tasks run on it.

    llm eval lm-eval --tasks hellaswag,arc_easy --checkpoint out/ckpt.pt --limit 100
    llm eval lm-eval --tasks my_task --include-path tasks/ --hf-model gpt2/

The harness builds the prompts, few-shot examples and metrics; a model answers three kinds of
request (``Instance.args``), implemented here on top of our own scoring and generation:

    loglikelihood(context, continuation)  -> (sum of the continuation's token log-probs, is_greedy)
    loglikelihood_rolling(text)           -> log-likelihood of the whole text, in block_size windows
    generate_until(context, gen_kwargs)   -> text generated until a stop string or max_gen_toks

Tokenization is the one ``llm eval mc`` uses: context and continuation are encoded separately and
joined (the harness's Hugging Face model encodes them jointly and splits; with GPT-2's BPE, whose
pre-tokenizer splits before a space, the two agree whenever the continuation starts with a space, as
the harness's continuations do).  An empty context conditions on <|endoftext|>.  A context that does
not fit is cut from the left, the continuation kept whole, so an item scores the same here as in
``llm eval mc``.

lm-eval is an optional extra (``pip install lm-eval``): this module imports it on first use, so
``import llm.eval`` never needs it.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from tqdm.auto import tqdm

from ..scoring import _has_head, final_hidden_states
from .common import generate_until as _generate_until

__all__ = ["MODEL_NAME", "make_lm", "require_lm_eval", "run_lm_eval"]

MODEL_NAME = "llm-from-scratch"  # the name the class is registered under in lm-eval's model registry
_CLASS = None  # OurLM, defined on first use (its base class comes from lm_eval)


def require_lm_eval():
    """The ``lm_eval`` package, or an ImportError whose one line says how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError as exc:
        raise ImportError("llm eval lm-eval needs lm-evaluation-harness: pip install lm-eval") from exc
    return lm_eval


def _continuation_scores(model, rows: list[list[int]], n_cont: list[int]) -> list[tuple[float, bool]]:
    """(sum log p, every token the argmax) of the last ``n_cont[i]`` tokens of each row, given the
    tokens before them; rows right-padded into one batch (a causal model's scored positions never
    see the padding)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows) - 1
    idx = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # (B, T) inputs
    for i, r in enumerate(rows):
        idx[i, : len(r) - 1] = torch.tensor(r[:-1], dtype=torch.long)
    # (row, position) of every scored target: the n last tokens of row i are predicted at positions
    # len - 1 - n .. len - 2 of its input.
    where_b = [i for i, (r, n) in enumerate(zip(rows, n_cont)) for _ in range(n)]
    where_t = [t for r, n in zip(rows, n_cont) for t in range(len(r) - 1 - n, len(r) - 1)]
    targets = torch.tensor([t for r, n in zip(rows, n_cont) for t in r[len(r) - n:]], device=device)  # (N,)
    if _has_head(model):  # the head only on the scored positions: never (B, T, V) logits
        hidden = final_hidden_states(model, idx)[where_b, where_t]  # (N, C)
        logits = model.lm_head(hidden).float()  # (N, V)
    else:
        logits = model(idx)[0][where_b, where_t].float()  # (N, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    greedy = logits.argmax(dim=-1) == targets  # (N,)
    out, start = [], 0
    for n in n_cont:
        out.append((float(picked[start:start + n].sum()), bool(greedy[start:start + n].all())))
        start += n
    return out


def _define_class(lm_eval):
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class OurLM(LM):
        """An ``llm`` GPT and tokenizer as an lm-eval model (see the module docstring)."""

        def __init__(self, model, tokenizer, *, batch_size: int = 8, autocast=contextlib.nullcontext,
                     seed: int = 1234, progress: bool = True):
            super().__init__()
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.model, self.tokenizer = model.eval(), tokenizer
            self.batch_size, self.autocast, self.progress = batch_size, autocast, progress
            self.block = model.config.block_size
            self.eot = tokenizer.eot_token
            self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

        @property
        def device(self):
            return next(self.model.parameters()).device

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

        # -- log-likelihood -----------------------------------------------------------------
        def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
            """(token row, continuation length): context cut from the left to fit the block."""
            ctx = self.tokenizer.encode(context) if context else []
            cont = self.tokenizer.encode(continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r:.60} encodes to no tokens")
            if len(cont) > self.block:
                raise ValueError(f"continuation {continuation[:60]!r} is {len(cont)} tokens, longer than the "
                                 f"model's block of {self.block}")
            return ((ctx or [self.eot]) + cont)[-(self.block + 1):], len(cont)

        @torch.no_grad()
        def _score(self, pairs: list[tuple[list[int], int]], desc: str) -> list[tuple[float, bool]]:
            """Score token rows in batches of similar length (longest first: an out-of-memory shows
            on the first batch, and padding is small)."""
            order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
            out: list = [None] * len(pairs)
            for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch",
                              disable=not self.progress):
                chunk = order[start:start + self.batch_size]
                with self.autocast():
                    scores = _continuation_scores(self.model, [pairs[i][0] for i in chunk],
                                                  [pairs[i][1] for i in chunk])
                for i, s in zip(chunk, scores):
                    out[i] = s
            return out

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self._score([self._pair(*r.args[:2]) for r in requests], "loglikelihood")

        def loglikelihood_rolling(self, requests) -> list[float]:
            """Each text in disjoint windows of block_size predicted tokens (each conditioned on the
            block before it, the first on <|endoftext|>): lm-eval's own windowing, context 1."""
            pairs, owner = [], []
            for n, r in enumerate(requests):
                tokens = self.tokenizer.encode(r.args[0])
                for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                        tokens, prefix_token=self.eot, max_seq_len=self.block, context_len=1)):
                    pairs.append((ctx + pred, len(pred)))
                    owner.append(n)
            totals = [0.0] * len(requests)
            for n, (logprob, _) in zip(owner, self._score(pairs, "loglikelihood_rolling")):
                totals[n] += logprob
            return totals

        # -- generation -----------------------------------------------------------------------
        def generate_until(self, requests) -> list[str]:
            """One prompt at a time (rows of a batch share positions: prompts of different lengths
            cannot), KV-cached; greedy unless gen_kwargs ask for sampling."""
            out = []
            for r in tqdm(requests, desc="generate_until", unit="request", disable=not self.progress):
                context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                if not kwargs.pop("do_sample", temperature > 0):
                    temperature = 0.0
                elif temperature == 0.0:
                    temperature = 1.0
                top_p = kwargs.pop("top_p", None)
                with self.autocast():
                    text = _generate_until(self.model, self.tokenizer, context, stops=until, max_new_tokens=max_new,
                                           temperature=temperature, top_p=top_p if temperature > 0 else None,
                                           generator=self.generator)[0]
                out.append(text)
            return out

    register_model(MODEL_NAME)(OurLM)
    return OurLM


def make_lm(model, tokenizer, **kwargs):
    """An lm-eval ``LM`` over ``model`` and ``tokenizer`` (keyword arguments: batch_size, autocast,
    seed, progress).  The class is registered as ``MODEL_NAME`` the first time."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _define_class(require_lm_eval())
    return _CLASS(model, tokenizer, **kwargs)


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | None = None,
                num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
                autocast=contextlib.nullcontext, seed: int = 1234, progress: bool = True) -> dict:
    """{"metrics": {"<task>/<metric>": value}, "items": per-sample records, "versions", "n-shot"}
    of ``lm_eval.simple_evaluate`` on ``tasks`` (names, or YAML tasks found under ``include_path``)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("--tasks: name at least one task")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path}: no such folder")
    # Indexing lm-eval's own ~15,000 task configs takes ~15 s: when --include-path has every task
    # asked for, only that folder is indexed.
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval's own, or YAML tasks under "
                         "--include-path; `lm-eval ls tasks` lists them)")
    lm = make_lm(model, tokenizer, batch_size=batch_size, autocast=autocast, seed=seed, progress=progress)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=True, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=0)
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if key in ("alias", "name") or "_stderr" in key:
                continue
            metrics[f"{task}/{key.split(',')[0]}"] = value  # "acc,none" -> "acc"
    items = [{"task": task, "doc_id": s["doc_id"], "target": s.get("target"), "resps": s.get("filtered_resps"),
              **{k: s[k] for k in s if k in {"acc", "acc_norm", "exact_match", "word_perplexity"}}}
             for task, samples in results.get("samples", {}).items() for s in samples]
    out = {"metrics": metrics, "items": items, "versions": results.get("versions", {}),
           "n-shot": results.get("n-shot", {})}
    # NumPy scalars and tuples as plain JSON values, so the results file can be written as it is
    return json.loads(json.dumps(out, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
