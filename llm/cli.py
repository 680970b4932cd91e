"""``python -m llm <command>`` (or the ``llm`` console script).

    llm prepare [SOURCE]          tokenize a corpus, print token counts and where the files are
    llm pretrain [--flags]        train a GPT (every TrainConfig field is a flag; --help lists them)
    llm generate --prompt TEXT    continue prompts with a trained checkpoint or a Hugging Face folder
    llm eval TASK [--flags]       perplexity | mc | gsm8k | humaneval, a table and a results JSON
    llm sft [--flags]             instruction fine-tuning (Alpaca format), full or LoRA
    llm dpo [--flags]             preference tuning on chosen/rejected pairs
    llm classify [--flags]        fine-tune for classification (SMS spam), or classify one text
    llm chat --checkpoint CKPT    interactive chat with an instruction-tuned model
    llm tokenizer train --data SOURCE --vocab-size N --out DIR    train a byte-level BPE tokenizer
    llm export hf|gguf CKPT OUT   a Hugging Face folder or a GGUF file

Subcommands live in :data:`COMMANDS` (name -> (help, add_arguments, run)).  User mistakes (a missing checkpoint, a bad value) print one
``error:`` line and exit 2 instead of a traceback; set ``LLM_DEBUG=1`` to see the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Callable

DESCRIPTION = """A GPT built from scratch: tokenize a corpus, pretrain, generate.

examples:
  llm prepare tinyshakespeare
  llm pretrain                                  # cpu-small on tinyshakespeare, a few minutes on 2 cores
  llm pretrain --preset tiny --data the-verdict --max-steps 50 --out-dir out/tiny
  torchrun --standalone --nproc_per_node 2 -m llm pretrain     # data-parallel
  llm generate --prompt "ROMEO:" --max-new-tokens 100
  llm prepare tinyshakespeare --tokenizer path/to/Qwen3-0.6B     # any Hugging Face tokenizer.json
  llm eval perplexity tinyshakespeare --split val    # of out/ckpt.pt
  llm sft --hf-model gpt2-dir --lora-rank 16 --out-dir out/sft   # instruction-tune GPT-2 with LoRA
  llm dpo --checkpoint out/sft/ckpt.pt --out-dir out/dpo         # then preference-tune it
  llm sft --resume --out-dir out/sft                             # continue an interrupted run
  llm pretrain --logger tensorboard,wandb                        # also TensorBoard / offline wandb logs
"""
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option, and descriptions printed as written."""


def _tokenizer_help(default: str | None = None) -> str:
    from .tokenizer import TOKENIZER_HELP  # (imports tiktoken: ~15 ms of `llm <command> --help`)

    return TOKENIZER_HELP + (f"; if not given, {default}" if default else "")


# ---------------------------------------------------------------------------------------------
# prepare


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default="tinyshakespeare",
                   help="corpus name, text file, folder, glob, or hf:<dataset>[:<config>]")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    p.add_argument("--tokenizer", default="gpt2", metavar="PATH", help=_tokenizer_help())
    p.add_argument("--force", action="store_true", help="re-tokenize even if cached")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    g = p.add_argument_group("web-scale corpora: streamed, parallel, into token shards (llm/data/shards.py)")
    g.add_argument("--shards", metavar="DIR", default=None,
                   help="write fixed-size token shards into DIR instead (jsonl/parquet/text files, or hf:... "
                        "streamed); run again to finish an interrupted one")
    g.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    g.add_argument("--val-shards", type=int, default=1, help="the first this many shards are the validation split")
    g.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (a sample)")
    g.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes")
    g.add_argument("--text-field", default="text", help="the text field of jsonl rows, parquet files and hf: datasets")


def run_prepare(args: argparse.Namespace) -> int:
    from . import data
    from .tokenizer import get_tokenizer

    if args.shards is not None:
        import time

        from .data.shards import prepare_shards

        t0 = time.perf_counter()
        result = prepare_shards(args.source, args.shards, get_tokenizer(args.tokenizer), shard_tokens=args.shard_tokens,
                                val_shards=args.val_shards, max_tokens=args.max_tokens, num_proc=args.num_proc,
                                text_field=args.text_field, progress=args.progress)
        seconds = time.perf_counter() - t0
        n_val = sum(s["tokens"] for s in result.meta["shards"] if s["split"] == "val")
        print(f"{args.source}: {result.n_tokens:,} tokens ({result.n_tokens - n_val:,} train, {n_val:,} val) in "
              f"{len(result.meta['shards'])} shards in {args.shards}; this run {seconds:.1f} s, "
              f"{result.meta['seconds_last_run']:.1f} s tokenizing with {args.num_proc} processes")
        return EXIT_OK
    prepared = data.prepare(args.source, val_fraction=args.val_fraction, tokenizer=get_tokenizer(args.tokenizer),
                            progress=args.progress, force=args.force)
    n_train, n_val = len(prepared.train_tokens()), len(prepared.val_tokens())
    print(f"{args.source}: {n_train + n_val:,} tokens ({n_train:,} train, {n_val:,} val)")
    for key, value in prepared.meta.items():
        if isinstance(value, (str, int, float)):
            print(f"  {key}: {value}")
    for name in ("train_path", "val_path", "dir"):
        print(f"  {name}: {getattr(prepared, name)}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# pretrain: one flag per TrainConfig field, generated so the two can never drift apart


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field.  Untyped flags are left out of the parsed namespace
    (default SUPPRESS) so that ``--resume`` can tell what the user asked to change; the defaults
    are TrainConfig's and shown in the help."""
    from .model import PRESETS
    from .train.pretrain import CHOICES, TrainConfig

    helps = TrainConfig.help()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        help_text = helps[f.name].replace("%", "%%")
        if f.default is None and "None" not in help_text:
            help_text += " (None: keep the preset's value)"
        help_text += f" (default: {str(f.default).replace('%', '%%')})"
        kw: dict = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if "bool" in kind:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = int if "int" in kind else float if "float" in kind else str
        if f.name == "preset":
            kw["choices"] = list(PRESETS)
        elif f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        elif "action" not in kw:
            kw["metavar"] = f.name.upper()  # argparse shows {a,b,c} for the fields with choices
        p.add_argument(flag, **kw)


def run_pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import CKPT_NAME, TrainConfig, resume_config, train

    typed = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**typed)  # the defaults for what was not typed
    ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)
    if cfg.resume and os.path.isfile(ckpt_path):  # (no checkpoint: train() says so)
        from .train.checkpoint import load_checkpoint

        # A resumed run continues with the settings it was started with; typed flags override them.
        cfg = resume_config(load_checkpoint(ckpt_path).get("train_config", {}), {**typed, "out_dir": cfg.out_dir})
    train(cfg)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# generate


def add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=os.path.join("out", "ckpt.pt"), help="training checkpoint to load")
    src.add_argument("--hf-dir", default=None, help="Hugging Face GPT-2 folder (config.json + model.safetensors) instead")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for several prompts (default: the run's sample prompt)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help=_tokenizer_help("the one the checkpoint was trained with, or the --hf-dir folder's "
                                        "tokenizer.json (gpt2 if it has none)"))
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="recompute the context every step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def _load_for_generate(args: argparse.Namespace, device):
    """(model, default prompt, tokenizer it was trained with) from --hf-dir or --checkpoint."""
    from .train.checkpoint import load_checkpoint, model_from_checkpoint
    from .model import GPT
    from .tokenizer import checkpoint_tokenizer, folder_tokenizer

    if args.hf_dir is not None:
        if not os.path.isdir(args.hf_dir):
            raise FileNotFoundError(f"--hf-dir {args.hf_dir}: no such folder")
        return GPT.from_pretrained(args.hf_dir).to(device).eval(), "\n", folder_tokenizer(args.hf_dir)
    ckpt = load_checkpoint(args.checkpoint)
    prompt = ckpt.get("train_config", {}).get("sample_prompt", "\n")
    return model_from_checkpoint(ckpt, device), prompt, checkpoint_tokenizer(ckpt)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate_text, stream_text
    from .tokenizer import check_vocab_fits, get_tokenizer
    from .train.train_setup import resolve_device

    device = resolve_device(args.device)
    model, default_prompt, trained_with = _load_for_generate(args, device)
    tokenizer = get_tokenizer(args.tokenizer or trained_with)
    check_vocab_fits(model.config.vocab_size, tokenizer)
    prompts = args.prompt or [default_prompt]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
              use_cache=args.use_cache, generator=gen)
    if len(prompts) == 1:  # stream it, token by token
        pieces = stream_text(model, tokenizer, prompts[0], args.max_new_tokens, **kw)
        first = next(pieces, "")  # checks the settings and the prompt (and samples): errors come before output
        sys.stdout.write(prompts[0] + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return EXIT_OK
    for i, (prompt, completion) in enumerate(zip(prompts, generate_text(model, tokenizer, prompts, args.max_new_tokens, **kw))):
        print(f"=== [{i + 1}/{len(prompts)}] ===\n{prompt}{completion}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------

def _lazy(module: str, name: str) -> Callable:
    """``llm.<module>.<name>``, imported on first call, so ``llm --help`` stays fast."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"llm.{module}"), name)(*args, **kwargs)

    return call


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("tokenize a corpus into train/val token files", add_prepare_args, run_prepare),
    "pretrain": ("train a GPT on a corpus (see --help for every option)", add_pretrain_args, run_pretrain),
    "generate": ("generate text from a checkpoint", add_generate_args, run_generate),
    "eval": ("evaluate a model: perplexity, multiple choice, GSM8K, HumanEval", _lazy("eval.cli", "add_eval_args"),
             _lazy("eval.cli", "run_eval")),
    "sft": ("supervised instruction fine-tuning (full or LoRA)", _lazy("finetune.sft", "add_sft_args"), _lazy("finetune.sft", "run_sft")),
    "dpo": ("direct preference optimization on chosen/rejected pairs", _lazy("finetune.dpo", "add_dpo_args"),
            _lazy("finetune.dpo", "run_dpo")),
    "classify": ("fine-tune a GPT as a text classifier (the book's spam classifier), or --predict with one",
                 _lazy("finetune.classify", "add_classify_args"), _lazy("finetune.classify", "run_classify")),
    "chat": ("talk to an instruction-tuned checkpoint (Alpaca template, streamed)", _lazy("chat", "add_chat_args"),
             _lazy("chat", "run_chat")),
    "tokenizer": ("train a byte-level BPE tokenizer on a corpus (tiktoken format)", _lazy("bpe", "add_tokenizer_args"),
                  _lazy("bpe", "run_tokenizer")),
    "export": ("export a checkpoint: a Hugging Face folder (hf) or a llama.cpp file (gguf)",
               _lazy("export", "add_export_args"), _lazy("export", "run_export")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm", description=DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        add_args(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .train.checkpoint import CheckpointError
    from .train.pretrain import NonFiniteLossError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `llm generate ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except NonFiniteLossError as exc:
        return _fail(exc, EXIT_FAILED)
    except (CheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        return _fail(exc, EXIT_USAGE)
    except (RuntimeError, OSError) as exc:  # e.g. a corpus that cannot be downloaded offline
        return _fail(exc, EXIT_FAILED)
    except ImportError as exc:  # an optional package a command needs (datasets, transformers)
        return _fail(exc, EXIT_FAILED)


def _fail(exc: BaseException, code: int) -> int:
    if os.environ.get("LLM_DEBUG"):
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
