"""``llm eval <task>``: load a model, run one evaluation, print its metrics, save them as JSON.

    llm eval perplexity the-verdict --checkpoint out/ckpt.pt --stride 512
    llm eval mc hellaswag_val.jsonl --hf-model gpt2/ --limit 500
    llm eval gsm8k --checkpoint out/ckpt.pt --n-shot 5 --limit 100
    llm eval humaneval --hf-model gpt2/ --n-samples 10 --temperature 0.8 --k 1 10
    llm eval humaneval --canonical          # the dataset's own solutions: a check of the sandbox
    llm eval lm-eval --tasks hellaswag,arc_easy --checkpoint out/ckpt.pt --limit 100   # pip install lm-eval

The results file (default ``eval_<task>.json`` beside the model) holds the task, its metrics, the
configuration, the model's source, the timing and the per-item predictions; it is written
atomically, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TASKS = {
    "perplexity": "perplexity of a corpus or token file (sliding windows past the context)",
    "mc": "multiple choice by log-likelihood (JSONL {context, choices, label}, HellaSwag JSONL, MMLU CSV)",
    "gsm8k": "grade-school math: few-shot greedy generation, exact match of the final number",
    "humaneval": "Python from docstrings: sample, run the tests in a sandbox, pass@k",
    "lm-eval": "any lm-evaluation-harness task (its own, or YAML tasks in --include-path); pip install lm-eval",
}
DEFAULT_CHECKPOINT = os.path.join("out", "ckpt.pt")


def _add_common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="training checkpoint to evaluate")
    src.add_argument("--hf-model", default=None, metavar="DIR", help="Hugging Face GPT-2 folder instead")
    from ..tokenizer import TOKENIZER_HELP

    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help=f"{TOKENIZER_HELP}; if not given, the one the checkpoint was trained with, or the "
                        "--hf-model folder's tokenizer.json (gpt2 if it has none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--out", default=None, help="results JSON; if not given, eval_<task>.json beside the model")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N items (perplexity: the first N tokens)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from ..cli import (
        _Formatter,  # imported here: llm.cli imports this module to build its parser
    )

    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    def task(name):
        return sub.add_parser(name, help=TASKS[name], description=TASKS[name], formatter_class=_Formatter)

    sp = task("perplexity")
    sp.add_argument("source", help="corpus name, text file, folder, glob, hf:<dataset>, or a .bin/.npy token file")
    sp.add_argument("--split", choices=["all", "train", "val"], default="all",
                    help="which part of a corpus: all of it, or the train/val split of --val-fraction")
    sp.add_argument("--val-fraction", type=float, default=0.1, help="the split used by --split train/val")
    sp.add_argument("--block-size", type=int, default=None, help="window length; if not given, the model's block_size")
    sp.add_argument("--stride", type=int, default=None,
                    help="tokens between window starts; if not given, the block size (no overlap)")
    sp.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")

    sp_mc = task("mc")
    sp_mc.add_argument("path", help="items file")
    sp_mc.add_argument("--format", choices=["auto", "mc", "hellaswag", "mmlu"], default="auto",
                       help="file format (auto: .csv is MMLU, JSONL with 'endings' is HellaSwag)")
    sp_mc.add_argument("--n-shot", type=int, default=0, help="solved examples from the same file before each item")
    sp_mc.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw")

    sp_gsm = task("gsm8k")
    sp_gsm.add_argument("--data", default=None, help="GSM8K JSONL; if not given, the pinned test split")
    sp_gsm.add_argument("--n-shot", type=int, default=5,
                        help="solved examples before each question (the first records other than the question)")
    sp_gsm.add_argument("--max-new-tokens", type=int, default=256, help="longest answer generated")

    sp_he = task("humaneval")
    sp_he.add_argument("--data", default=None, help="HumanEval JSONL(.gz); if not given, the pinned 164 problems")
    sp_he.add_argument("--n-samples", type=int, default=1, help="completions sampled per problem")
    sp_he.add_argument("--k", type=int, nargs="+", default=[1], help="report pass@k for these k (each <= n-samples)")
    sp_he.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (only with --n-samples 1)")
    sp_he.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    sp_he.add_argument("--max-new-tokens", type=int, default=300, help="longest completion")
    sp_he.add_argument("--seed", type=int, default=1234, help="seed of the sampling generator")
    sp_he.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run (wall clock)")
    sp_he.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of each program")
    sp_he.add_argument("--workers", type=int, default=4, help="programs run at the same time")
    sp_he.add_argument("--unsafe-no-sandbox", action="store_true",
                       help="where bubblewrap cannot run: execute model-written code anyway, as you, behind a "
                            "Python guard that an adversarial program gets around (says what is not contained)")
    sp_he.add_argument("--canonical", action="store_true",
                       help="run the dataset's own solutions instead of a model (all should pass)")
    from ..train.train_setup import DTYPES

    sp_lm = task("lm-eval")
    sp_lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (hellaswag,arc_easy)")
    sp_lm.add_argument("--include-path", default=None, metavar="DIR", help="folder of task YAML files of your own")
    sp_lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples; if not given, each task's own")
    sp_lm.add_argument("--batch-size", type=int, default=8, help="log-likelihood requests per forward pass")
    sp_lm.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="autocast dtype (auto: bf16 on a GPU that has it, fp32 on the CPU)")
    sp_lm.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw and of any sampling")
    for task_parser in (sp, sp_mc, sp_gsm, sp_he, sp_lm):
        _add_common(task_parser)


def _load_model(args, device):
    """(model, description of where it came from) for --hf-model or --checkpoint; the description's
    ``tokenizer`` is the one the model was trained with."""
    from ..train.checkpoint import load_checkpoint, model_from_checkpoint
    from ..model import GPT
    from ..tokenizer import checkpoint_tokenizer, folder_tokenizer

    if args.hf_model is not None:
        if not os.path.isdir(args.hf_model):
            raise FileNotFoundError(f"--hf-model {args.hf_model}: no such folder")
        model = GPT.from_pretrained(args.hf_model).to(device).eval()
        return model, {"kind": "hf", "path": os.path.abspath(args.hf_model),
                       "tokenizer": folder_tokenizer(args.hf_model)}
    path = args.checkpoint
    ckpt = load_checkpoint(path)
    source = {"kind": "checkpoint", "path": os.path.abspath(path), "step": ckpt.get("step"),
              "tokenizer": checkpoint_tokenizer(ckpt)}
    return model_from_checkpoint(ckpt, device), source


def _default_out(args) -> Path:
    name = f"eval_{args.task}.json"
    if args.task == "humaneval" and args.canonical:
        return Path(name)  # no model involved: the current folder
    if args.hf_model is not None:
        return Path(args.hf_model) / name
    return Path(args.checkpoint).parent / name


def _check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _run_task(args, model, tokenizer) -> tuple[dict, dict, list]:
    """(metrics, task config, per-item records) of the task in ``args``."""
    if args.task == "perplexity":
        from .perplexity import load_tokens, perplexity

        tokens = load_tokens(args.source, split=args.split, val_fraction=args.val_fraction, progress=args.progress,
                             tokenizer=tokenizer)
        if args.limit is not None:
            tokens = tokens[: args.limit]
        metrics = perplexity(model, tokens, block_size=args.block_size, stride=args.stride,
                             batch_size=args.batch_size, progress=args.progress)
        block = args.block_size or model.config.block_size
        config = dict(source=args.source, split=args.split, val_fraction=args.val_fraction, block_size=block,
                      stride=args.stride or block, batch_size=args.batch_size, limit=args.limit)
        return metrics, config, []
    if args.task == "mc":
        from .multiple_choice import evaluate_multiple_choice, load_items

        items = load_items(args.path, args.format)
        out = evaluate_multiple_choice(model, tokenizer, items, n_shot=args.n_shot, seed=args.seed,
                                       limit=args.limit, progress=args.progress)
        config = dict(path=os.path.abspath(args.path), format=args.format, n_shot=args.n_shot, seed=args.seed,
                      limit=args.limit)
        return out["metrics"], config, out["items"]
    if args.task == "gsm8k":
        from .gsm8k import evaluate_gsm8k, load_gsm8k

        out = evaluate_gsm8k(model, tokenizer, load_gsm8k(args.data), n_shot=args.n_shot, limit=args.limit,
                             max_new_tokens=args.max_new_tokens, progress=args.progress)
        config = dict(data=args.data or "gsm8k", n_shot=args.n_shot, max_new_tokens=args.max_new_tokens,
                      limit=args.limit)
        return out["metrics"], config, out["items"]
    if args.task == "lm-eval":
        from ..train.train_setup import choose_precision
        from .lm_eval_adapter import run_lm_eval

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        precision = choose_precision(next(model.parameters()).device, args.dtype)
        print(precision.describe(), file=sys.stderr, flush=True)
        out = run_lm_eval(model, tokenizer, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                          limit=args.limit, batch_size=args.batch_size, autocast=precision.autocast,
                          seed=args.seed, progress=args.progress)
        config = dict(tasks=tasks, include_path=args.include_path and os.path.abspath(args.include_path),
                      num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                      dtype=precision.name, seed=args.seed, versions=out["versions"], n_shot=out["n-shot"])
        return out["metrics"], config, out["items"]
    from .humaneval import evaluate_humaneval, load_problems
    from .sandbox import containment

    limits = _humaneval_limits(args)
    print(containment(limits), file=sys.stderr, flush=True)
    problems = load_problems(args.data)[: args.limit]
    out = evaluate_humaneval(model, tokenizer, problems, n=args.n_samples, ks=tuple(args.k),
                             temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                             limits=limits, workers=args.workers, seed=args.seed, canonical=args.canonical,
                             progress=args.progress)
    config = dict(data=args.data or "humaneval", n_samples=args.n_samples, k=args.k, temperature=args.temperature,
                  top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, timeout=args.timeout,
                  memory_mb=args.memory_mb, canonical=args.canonical, limit=args.limit, sandbox=limits.sandbox)
    return out["metrics"], config, out["items"]


def _humaneval_limits(args: argparse.Namespace):
    from .sandbox import Limits

    return Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb << 20,
                  sandbox="unsafe" if args.unsafe_no_sandbox else "bwrap")


def run_eval(args: argparse.Namespace) -> int:
    from ..train.train_setup import resolve_device

    _check_positive(args, "limit", "block_size", "stride", "batch_size", "n_samples", "max_new_tokens", "workers",
                    "memory_mb")
    if getattr(args, "n_shot", 0) < 0:
        raise ValueError(f"--n-shot must be >= 0, got {args.n_shot}")
    if (getattr(args, "num_fewshot", None) or 0) < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.task == "lm-eval":  # before a model is loaded: fail at once when the package is missing
        from .lm_eval_adapter import require_lm_eval

        require_lm_eval()
    started = time.time()
    model = tokenizer = None
    source: dict = {"kind": "none (canonical solutions)"}
    device = resolve_device(args.device)
    if args.task == "humaneval":  # before a model is loaded: no sandbox here means no HumanEval here
        from .sandbox import check_can_run

        check_can_run(_humaneval_limits(args))
    if not (args.task == "humaneval" and args.canonical):
        from ..tokenizer import check_vocab_fits, get_tokenizer

        model, source = _load_model(args, device)
        tokenizer = get_tokenizer(args.tokenizer or source["tokenizer"])
        check_vocab_fits(model.config.vocab_size, tokenizer)
        source["tokenizer"] = tokenizer.name  # the results record the one used
    metrics, config, items = _run_task(args, model, tokenizer)
    seconds = time.time() - started

    out = Path(args.out) if args.out else _default_out(args)
    result = {
        "task": args.task,
        "metrics": metrics,
        "config": config,
        "model": source,
        "device": str(device),
        "timing": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                   "seconds": round(seconds, 3)},
        "items": items,
    }
    from ..train.checkpoint import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    _print_table(args.task, source, metrics, seconds, out)
    return 0  # llm.cli's EXIT_OK


def _print_table(task: str, source: dict, metrics: dict, seconds: float, out: Path) -> None:
    rows = [("task", task), ("model", source.get("path", source["kind"]))]
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = str(value)
        rows.append((key, text))
    rows += [("seconds", f"{seconds:.1f}"), ("results", str(out))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
