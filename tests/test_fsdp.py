"""--fsdp (llm/train/fsdp.py): 2 CPU processes (gloo) train like 1 process with the same global batch,
and their sharded checkpoint resumes on 1 process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llm.train.checkpoint import CheckpointError, load_checkpoint, load_model
from llm.train.pretrain import TrainConfig, train
from llm.train.train_log import read_metrics, step_losses

pytestmark = pytest.mark.slow  # ~30 s: two extra processes importing torch, and four short runs

# lr in its linear warmup for all 8 steps and random windows: neither depends on --max-steps, so a 6-step run
# resumed to 8 steps is the same run as an 8-step one
RUN = dict(preset="tiny", data="the-verdict", block_size=32, lr=3e-3, warmup_steps=20, loader="random", eval_interval=3,
           eval_iters=2, checkpoint_interval=3, sample_tokens=8, device="cpu", seed=3)


def test_two_fsdp_ranks_match_one_process_and_their_checkpoint_resumes_on_one(tmp_path):
    fsdp_dir = tmp_path / "fsdp"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llm",
           "pretrain", "--fsdp", *flags, "--max-steps=6", "--batch-size=2", f"--out-dir={fsdp_dir}", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2" in proc.stdout and proc.stdout.count("--- sample at step 6") == 1  # rank 0 prints

    # the uninterrupted reference: 1 process, no sharding, the same global batch, 8 steps
    single = train(TrainConfig(**RUN, max_steps=8, batch_size=4, out_dir=str(tmp_path / "single"), progress=False))
    sharded = step_losses(read_metrics(fsdp_dir / "metrics.jsonl"))
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(single["losses"][:6]), rtol=1e-5, atol=0)
    ckpt = load_checkpoint(fsdp_dir / "ckpt.pt")
    assert ckpt["sharded_state"] == "ckpt_fsdp-00000006" and ckpt["optimizer"] is None and ckpt["world_size"] == 2
    assert load_model(fsdp_dir / "ckpt.pt").num_parameters() == load_model(tmp_path / "single" / "ckpt.pt").num_parameters()

    with pytest.raises(CheckpointError, match="written with --fsdp"):
        train(TrainConfig(**RUN, max_steps=8, batch_size=4, out_dir=str(fsdp_dir), resume=True, progress=False))
    resumed = train(TrainConfig(**RUN, max_steps=8, batch_size=4, out_dir=str(fsdp_dir), resume=True, fsdp=True,
                                progress=False))  # 1 process: DCP reshards the 2 ranks' state
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(single["losses"][6:]), rtol=1e-5, atol=0)
    assert [p.name for p in fsdp_dir.glob("ckpt_fsdp-*")] == ["ckpt_fsdp-00000008"]  # the old shards are gone
    a, b = load_model(fsdp_dir / "ckpt.pt").state_dict(), load_model(tmp_path / "single" / "ckpt.pt").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_fsdp_refuses_fp16():
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        TrainConfig(fsdp=True, dtype="float16").validate()


def test_bf16_fsdp_on_a_llama_preset_trains_like_bf16_autocast(tmp_path):
    """One process with its own group: bf16 gathered weights, fp32 gradient reduction, RoPE's fp32 angles
    kept fp32 (FSDP does not cast a block's inputs); the losses agree with plain bf16 autocast to bf16 noise."""
    run = dict(preset="llama-tiny", data="the-verdict", block_size=32, batch_size=2, max_steps=4, eval_interval=0,
               eval_iters=1, sample_tokens=0, device="cpu", dtype="bfloat16", progress=False, seed=5)
    sharded = train(TrainConfig(**run, fsdp=True, out_dir=str(tmp_path / "fsdp")))
    plain = train(TrainConfig(**run, out_dir=str(tmp_path / "plain")))
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(plain["losses"]), rtol=0, atol=5e-3)
    assert load_checkpoint(tmp_path / "fsdp" / "ckpt.pt")["sharded_state"] == "ckpt_fsdp-00000004"
