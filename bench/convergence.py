"""Do all backends train the same model?  Loss curves of one pretraining run per backend, overlaid.

    python bench/convergence.py                     # GPU: gpt2 preset, tinyshakespeare, 300 steps, bf16
    python bench/convergence.py --quick             # CPU smoke run: tiny preset, the-verdict, 8 steps, fp32

Every backend runs ``llm pretrain`` (the real training loop) from the same seed, on the same data
in the same order, so the curves may differ only by rounding: fp32 on a CPU agrees to ~1e-5, bf16
autocast to bf16 noise.  A curve that walks away from the others is a bug to find before any speed
work.  Reports, per backend, the final train/val loss and the largest per-step gap to the reference
over the last half of the run (where a systematic bias would show; early steps are noisy in bf16).
Writes the summary (CSV + Markdown), the per-step losses (``*_curves.csv``, a column per backend)
and the overlay PNG under bench/results/ (or --out).
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from bench.common import environment, markdown_table, save_figure, write_results  # noqa: E402
from llm.train.pretrain import TrainConfig, train  # noqa: E402


def run_backend(backend: str, args, work: Path) -> dict:
    cfg = TrainConfig(
        out_dir=str(work / backend), data=args.data, preset=args.preset, block_size=args.block_size,
        batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, min_lr=args.lr / 10,
        warmup_steps=max(1, args.steps // 20), eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        checkpoint_interval=0, sample_tokens=0, progress=not args.no_progress, seed=args.seed,
        device=args.device, dtype=args.dtype, kernels=backend, loader="random", overwrite=True,
    )
    return train(cfg)


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(11, 4))
    ref = curves.get("torch")
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, lw=1)
        if ref is not None and name != "torch":
            gap.plot(range(1, len(losses) + 1), [a - b for a, b in zip(losses, ref)], label=f"{name} - torch", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend()
    gap.axhline(0, color="k", lw=0.5)
    gap.set_xlabel("step")
    gap.set_ylabel("loss difference to the reference")
    if gap.lines[1:]:
        gap.legend()
    save_figure(fig, path, title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset on the-verdict, 8 steps")
    p.add_argument("--backends", nargs="+", default=None, help="default: torch pytorch triton cuda (quick: torch pytorch)")
    p.add_argument("--data", default=None, help="corpus (default tinyshakespeare; quick: the-verdict)")
    p.add_argument("--preset", default=None, help="model preset (default gpt2; quick: tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; quick: 8)")
    p.add_argument("--block-size", type=int, default=None, help="T (default 1024; quick: 32)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; quick: 2)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=None, help="val batches per eval (default 20; quick: 2)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA), float32 or bfloat16")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    q = args.quick
    args.backends = args.backends or (["torch", "pytorch"] if q else ["torch", "pytorch", "triton", "cuda"])
    args.data = args.data or ("the-verdict" if q else "tinyshakespeare")
    args.preset = args.preset or ("tiny" if q else "gpt2")
    args.steps = args.steps or (8 if q else 300)
    args.block_size = args.block_size or (32 if q else 1024)
    args.batch_size = args.batch_size or (2 if q else 16)
    args.eval_iters = args.eval_iters or (2 if q else 20)

    env = environment()
    env.update(preset=args.preset, data=args.data, steps=str(args.steps), batch=f"{args.batch_size} x {args.block_size}")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    curves, summary = {}, []
    with tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        for backend in args.backends:
            reason = kernels.available_backends(device).get(backend)
            if reason:
                print(f"skip {backend}: {reason}")
                summary.append({"backend": backend, "note": reason[:100]})
                continue
            print(f"== {backend}")
            result = run_backend(backend, args, Path(tmp))
            curves[backend] = result["losses"]
            summary.append({"backend": backend, "final_train_loss": result["losses"][-1],
                            "final_val_loss": result["final_val_loss"], "tok_s": result["tokens_per_s"]})
    ref = curves.get("torch")
    for row in summary:
        losses = curves.get(row["backend"])
        if ref is not None and losses is not None:
            half = len(ref) // 2
            row["max_gap_2nd_half"] = max(abs(a - b) for a, b in zip(losses[half:], ref[half:]))
    columns = ["backend", "final_train_loss", "final_val_loss", "max_gap_2nd_half", "tok_s", "note"]
    print(markdown_table(summary, columns))
    stem = write_results("convergence", summary, columns, env, args.out)
    curves_csv = stem.parent / f"{stem.name}_curves.csv"  # one row per step, one column per backend
    with open(curves_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *curves])
        writer.writerows([i + 1, *step] for i, step in enumerate(zip(*curves.values())))
    if curves:
        plot(curves, stem.with_suffix(".png"), f"{args.preset} on {args.data}, {env['device']}, {env['commit']}")
    print(f"wrote {stem}.csv, .md, .png and {curves_csv.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
