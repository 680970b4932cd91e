"""Fine-tuning on par with pretraining (llm/finetune/loop.py): exact --resume, gradient accumulation,
the warmup + cosine schedule, --compile and torchrun DDP, for llm sft, dpo and classify."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from llm.finetune import classify as C
from llm.finetune.loop import STATE_NAME
from llm.train.optim import lr_at
from llm.finetune.sft import SFTConfig, add_sft_args, run_sft, sft
from llm.train.checkpoint import CheckpointError
from llm.train.train_log import MetricsLog, read_metrics

SFT = dict(preset="tiny", limit=60, batch_size=2, max_steps=6, checkpoint_interval=2, eval_interval=3, eval_iters=1,
           dropout=0.1, lr=1e-3, warmup_steps=2, min_lr=1e-4, max_length=48, max_new_tokens=0, device="cpu",
           progress=False)


class Crash(Exception):
    pass


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_training(a: dict, b: dict, lr: float) -> None:
    """Two runs that summed the same gradients in another order.  Adam divides by sqrt(v): where a
    gradient is ~0 (embedding rows of tokens barely seen) fp32 noise becomes an update of up to lr.
    After a few steps those differences reach every weight (they change what the next step sees), so:
    no weight more than a tenth of one step's largest update apart, and on average a 200th of one.
    Wrong gradients (other batches, no averaging) move weights apart by ~lr everywhere."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=lr / 10)
        assert (a[k] - b[k]).abs().mean().item() < lr / 200, k


def test_sft_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    full = sft(SFTConfig(**SFT, out_dir=str(tmp_path / "full")))
    assert not (tmp_path / "full" / STATE_NAME).exists()  # a finished run drops its resume state

    log = MetricsLog.log

    def log_then_crash(self, **record):
        log(self, **record)
        if record.get("step") == 5 and "loss" in record:  # step 5 trained and logged, never checkpointed
            raise Crash

    monkeypatch.setattr(MetricsLog, "log", log_then_crash)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        sft(SFTConfig(**SFT, out_dir=str(out)))
    monkeypatch.setattr(MetricsLog, "log", log)
    state = torch.load(out / STATE_NAME, weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 1 and not (out / "ckpt.pt").exists()

    # a changed setting that decides the batches is refused, naming the flag
    with pytest.raises(ValueError, match="--batch-size cannot change when resuming"):
        sft(SFTConfig(**{**SFT, "batch_size": 4}, out_dir=str(out), resume=True))
    # the CLI's --resume takes the run's own settings: only the folder is typed
    p = argparse.ArgumentParser()
    add_sft_args(p)
    assert run_sft(p.parse_args(["--resume", "--out-dir", str(out), "--no-progress"])) == 0

    a, b = _weights(tmp_path / "full" / "ckpt.pt"), _weights(out / "ckpt.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, dropout included
    ra, rb = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    losses = lambda rs: [(r["step"], r["loss"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(rb) == losses(ra) and [s for s, _ in losses(rb)] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in ra if "loss" in r] == [lr_at(s, max_lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=6)
                                                  for s in range(1, 7)]
    assert [r["val_loss"] for r in rb if "val_loss" in r] == [r["val_loss"] for r in ra if "val_loss" in r]
    assert full["final_val_loss"] == rb[-1]["val_loss"]
    with pytest.raises(CheckpointError, match="that run finished"):
        sft(SFTConfig(**SFT, out_dir=str(out), resume=True))


def _toy(path, n=48):
    rows = [("spam", f"WIN cash prize {i} call now") if i % 2 else ("ham", f"see you at {i} tonight ok") for i in range(n)]
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    return path


CLASSIFY = dict(preset="tiny", trainable="all", lr=1e-3, max_steps=4, eval_interval=0, eval_iters=1, device="cpu",
                progress=False, split_seed=1)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    data = str(_toy(tmp_path / "toy.tsv"))
    big = C.classify(C.ClassifyConfig(**CLASSIFY, data=data, batch_size=4, out_dir=str(tmp_path / "big")))
    acc = C.classify(C.ClassifyConfig(**CLASSIFY, data=data, batch_size=2, grad_accum_steps=2,
                                      out_dir=str(tmp_path / "acc"), logger="tensorboard"))
    # the same 4 records a step (llm/finetune/loop.py's micro-batch order), the loss the mean over them
    torch.testing.assert_close(torch.tensor(acc["losses"]), torch.tensor(big["losses"]), rtol=1e-5, atol=1e-6)
    _assert_same_training(_weights(tmp_path / "big" / "ckpt.pt"), _weights(tmp_path / "acc" / "ckpt.pt"), 1e-3)
    steps = [r for r in read_metrics(tmp_path / "acc" / "metrics.jsonl") if "loss" in r]
    assert [r["tokens"] > 0 and r["tok_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in steps] == [True] * 4
    # --logger tensorboard on a fine-tuning command: the same numbers in the event file
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "acc" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tok_per_s", "batch_accuracy"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps], key
    assert [e.step for e in events.Scalars("eval/val_accuracy")] == [0, 4, 4]  # before, at the end, final


def test_compile_trains_the_compiled_module(tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def spy(model, **kw):
        out = real(model, backend="eager", **kw)  # dynamo's graph capture without inductor's C++ build
        compiled.append(out)
        return out

    monkeypatch.setattr(torch, "compile", spy)
    data = str(_toy(tmp_path / "toy.tsv"))
    res = C.classify(C.ClassifyConfig(**{**CLASSIFY, "max_steps": 2}, data=data, batch_size=4, compile=True,
                                      out_dir=str(tmp_path / "c")))
    plain = C.classify(C.ClassifyConfig(**{**CLASSIFY, "max_steps": 2}, data=data, batch_size=4,
                                        out_dir=str(tmp_path / "p")))
    assert len(compiled) == 1
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dpo_on_two_gloo_ranks_matches_one_process_with_accumulation(tmp_path):
    """2 ranks x 1 micro-batch of 2 pairs == 1 process x 2 micro-batches of 2: the same pairs each step."""
    from llm.train.checkpoint import FORMAT, atomic_save
    from llm.finetune.dpo import DPOConfig, dpo
    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    start = GPT(GPTConfig.from_preset("tiny"))
    ckpt = tmp_path / "start.pt"
    atomic_save({"format": FORMAT, "model": start.state_dict(), "model_config": start.config.to_dict()}, ckpt)
    run = dict(checkpoint=str(ckpt), limit=40, max_steps=3, batch_size=2, max_length=64, lr=1e-2, eval_iters=1,
               eval_interval=0, max_new_tokens=0, device="cpu", progress=False)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in run.items() if k != "progress"]
    ddp_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llm", "dpo", *flags, "--no-progress", f"--out-dir={ddp_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("DPO: ") == 1 and "x 2 pairs per epoch" in proc.stdout  # rank 0 alone prints

    single = dpo(DPOConfig(**run, grad_accum_steps=2, out_dir=str(tmp_path / "single")))
    ddp = [r["loss"] for r in read_metrics(ddp_dir / "metrics.jsonl") if "loss" in r]
    assert len(ddp) == 3 and ddp[-1] != ddp[0]
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    a, b = _weights(ddp_dir / "ckpt.pt"), _weights(tmp_path / "single" / "ckpt.pt")
    _assert_same_training(a, b, run["lr"])
