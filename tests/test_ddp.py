"""Data parallelism: 2 CPU processes (gloo) under torchrun train exactly like 1 process with the
same global batch -- the loader gives each rank its slice of the global batch, DDP averages the
gradients, and the logged loss is the all-reduced mean."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llm.train.checkpoint import load_checkpoint
from llm.train.pretrain import TrainConfig, train
from llm.train.train_log import read_metrics, step_losses

pytestmark = pytest.mark.slow  # ~15 s: two extra Python processes importing torch

RUN = dict(preset="tiny", data="the-verdict", block_size=32, max_steps=6, grad_accum_steps=2, lr=3e-3,
           warmup_steps=2, eval_iters=2, sample_tokens=0, device="cpu", seed=11)


def _mc_items(path, n=9):
    """Multiple-choice items for --eval-task (9: the ranks get 5 and 4)."""
    import json

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"context": f"I had {i} ", "choices": [" cats", " of them", " pictures"], "label": i % 3}) + "\n")
    return path


def test_two_gloo_ranks_match_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    run = {**RUN, "eval_task": f"mc:{_mc_items(tmp_path / 'mc.jsonl')}", "eval_every": 3}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in run.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llm", "pretrain", *flags, "--batch-size=2", f"--out-dir={ddp_dir}", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2" in proc.stdout
    assert proc.stdout.count("val loss before training") == 1  # only rank 0 prints

    single = train(TrainConfig(**run, batch_size=4, out_dir=str(tmp_path / "single"), progress=False))

    records = read_metrics(ddp_dir / "metrics.jsonl")
    ddp_losses = step_losses(records)
    assert len(ddp_losses) == 6  # one writer: rank 0
    assert ddp_losses[-1] < ddp_losses[0] - 0.1  # the weights really moved
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    ddp_val = [r["val_loss"] for r in records if "val_loss" in r]
    torch.testing.assert_close(torch.tensor(ddp_val), torch.tensor([single["initial_val_loss"], single["final_val_loss"]]),
                               rtol=1e-5, atol=0)
    # --eval-task: the ranks score their shares of the items, the counts are summed; equal to one process's
    mc = lambda recs: [(r["step"], r["mc_items"], r["mc_acc"], r["mc_acc_norm"]) for r in recs if "mc_acc" in r]  # noqa: E731
    single_mc = mc(read_metrics(tmp_path / "single" / "metrics.jsonl"))
    assert [m[:2] for m in single_mc] == [(0, 9), (3, 9), (6, 9)]
    assert [m[:2] for m in mc(records)] == [m[:2] for m in single_mc]
    torch.testing.assert_close(torch.tensor([m[2:] for m in mc(records)]), torch.tensor([m[2:] for m in single_mc]))
    ckpt = load_checkpoint(ddp_dir / "ckpt.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # every rank's RNG state is kept
    assert ckpt["tokens"] == single["tokens"] == 6 * 4 * 2 * 32
