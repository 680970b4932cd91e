"""Pretraining loop: learning, bitwise resume, atomic checkpoints, NaN handling, optimizer, schedule.

All runs use the ``tiny`` preset on the-verdict with 32-token windows, so each step takes a few
tens of milliseconds on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import types

import pytest
import torch

from llm.train import train_setup
from llm.train.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng,
    load_checkpoint,
    load_model,
    remove_stale_temps,
    restore_rank_rng,
)
from llm.data import TokenLoader
from llm.model import GPT, GPTConfig
from llm.train.optim import lr_at, param_groups
from llm.train.pretrain import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    check_resume_config,
    resume_config,
    train,
)
from llm.train.train_log import read_metrics, step_losses


def tiny_cfg(out_dir, **overrides) -> TrainConfig:
    base = dict(out_dir=str(out_dir), data="the-verdict", preset="tiny", block_size=32, batch_size=4,
                max_steps=10, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0, eval_iters=2,
                checkpoint_interval=0, sample_tokens=0, progress=False, device="cpu", seed=7)
    return TrainConfig(**{**base, **overrides})


class Crash(Exception):
    """Stands in for a kill: raised from the on_step hook."""


def crash_at(step_to_crash: int):
    def hook(step, record):
        if step == step_to_crash:
            raise Crash(step)
    return hook


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loss_decreases_on_the_verdict(tmp_path):
    summary = train(tiny_cfg(tmp_path, max_steps=40, eval_interval=20, eval_iters=4))
    losses = summary["losses"]
    assert len(losses) == 40 and summary["steps"] == 40
    assert losses[0] == pytest.approx(math.log(50257), abs=0.3)  # an untrained model is uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 2.0
    assert summary["tokens"] == 40 * 4 * 32
    # Everything the run promises to leave behind.
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 20, 40]
    assert all({"lr", "tokens", "tok_per_s", "grad_norm"} <= set(r) for r in records if "loss" in r)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 40
    model = load_model(tmp_path / "ckpt.pt")
    assert not model.training and model.config.block_size == 32


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_llama_and_qwen3_presets_learn(tmp_path, preset):
    """The Llama 3 and Qwen3 architectures (RMSNorm, RoPE, SwiGLU, GQA; Qwen3's q/k norms) train with
    the same loop, save and load back."""
    summary = train(tiny_cfg(tmp_path, preset=preset, max_steps=30, eval_iters=4))
    losses = summary["losses"]
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(50257), abs=0.3)
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 2.0
    assert summary["final_val_loss"] < summary["unigram_loss"]
    model = load_model(tmp_path / "ckpt.pt")
    assert model.config == GPTConfig.from_preset(preset, block_size=32) and model.rotary is not None


@pytest.mark.parametrize("loader", ["random", "sliding"])
def test_resume_is_bitwise_identical(tmp_path, loader):
    # Dropout makes the torch RNG matter; evals and samples in between must not disturb it.
    cfg = dict(max_steps=10, dropout=0.1, loader=loader, eval_interval=3, sample_interval=4, sample_tokens=3)
    full = train(tiny_cfg(tmp_path / "full", **cfg))

    with pytest.raises(Crash):  # dies at step 7: checkpoint of step 5 on disk, steps 6-7 logged
        train(tiny_cfg(tmp_path / "split", checkpoint_interval=5, **cfg), on_step=crash_at(7))
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 5
    resumed = train(tiny_cfg(tmp_path / "split", checkpoint_interval=5, resume=True, **cfg))

    assert resumed["steps_this_run"] == 5
    assert resumed["losses"] == full["losses"][5:]  # bitwise, not approx
    # metrics.jsonl of the crashed + resumed run reads as one run: the steps the crash logged
    # but never checkpointed (6, 7) were dropped and redone.
    assert step_losses(read_metrics(tmp_path / "split" / "metrics.jsonl")) == full["losses"]
    a = load_checkpoint(tmp_path / "full" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["initial_val_loss"] == full["initial_val_loss"]
    assert resumed["final_val_loss"] == full["final_val_loss"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half-write the temp file, then crash
            f.write(b"partial checkpoint bytes")
            raise OSError("simulated crash in the middle of torch.save")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_cfg(out, max_steps=6, checkpoint_interval=3))
    assert len(calls) == 2
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3  # the last good one survived intact
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "loss.png", "metrics.jsonl"]  # no temp left
    monkeypatch.setattr(torch, "save", real_save)
    assert train(tiny_cfg(out, max_steps=6, checkpoint_interval=3, resume=True))["steps"] == 6


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_save({"v": torch.arange(3)}, path)
    before = file_digest(path)

    def broken(obj, f, *a, **k):
        f.write(b"garbage")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": torch.arange(5)}, path)
    assert file_digest(path) == before
    assert list(tmp_path.iterdir()) == [path]
    assert torch.load(path, weights_only=True)["v"].tolist() == [0, 1, 2]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_forward = GPT.forward
    train_calls = []

    def poisoned_forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            train_calls.append(1)
            if len(train_calls) >= 5:  # step 5's loss is NaN
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    digest = {}
    def remember(step, record):
        if step == 3:
            digest["ckpt"] = file_digest(out / "ckpt.pt")

    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_cfg(out, max_steps=10, checkpoint_interval=3), on_step=remember)
    err = info.value
    assert err.step == 5 and math.isnan(err.loss)
    assert "step 5" in str(err) and "nan" in str(err) and "ckpt.pt" in str(err)
    assert file_digest(out / "ckpt.pt") == digest["ckpt"]  # untouched since step 3
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 4  # step 5 never logged


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_cfg(tmp_path / "empty", resume=True))


def test_resume_from_a_finetuning_checkpoint_is_a_clear_error(tmp_path):
    # llm sft / llm dpo write ckpt.pt with the model only: resuming pretraining from it must say so
    out = tmp_path / "sft"
    out.mkdir()
    model = GPT(GPTConfig.from_preset("tiny"))
    from llm.train.checkpoint import FORMAT

    torch.save({"format": FORMAT, "kind": "sft", "model_config": model.config.to_dict(), "model": model.state_dict()}, out / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a pretraining checkpoint \\(kind 'sft'"):
        train(tiny_cfg(out, resume=True))


def test_param_groups_decay_only_matrices():
    model = GPT(GPTConfig.from_preset("tiny"))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(n.endswith("attn.c_attn.bias") for n in no_decay["names"])
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.0.ln_1.weight"} <= set(no_decay["names"])
    assert "transformer.wte.weight" in decay["names"] and "transformer.h.0.mlp.c_fc.weight" in decay["names"]
    assert not any("bias" in n or ".ln_" in n for n in decay["names"])
    # the tied LM head is the token embedding: optimised once
    assert "lm_head.weight" not in decay["names"] + no_decay["names"]
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_parameters()


def test_lr_schedule_warmup_peak_cosine_floor():
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(1, **kw) == pytest.approx(1e-4)  # 1/10 of the peak
    assert lr_at(5, **kw) == pytest.approx(5e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # half way down the cosine: the mean
    assert lr_at(110, **kw) == pytest.approx(1e-4)  # the floor at max_steps ...
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # ... and after it
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(1, max_lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0 * (1 + math.cos(math.pi * 0.1)) / 2)


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    # sliding windows: two draws of 4 windows are the same 8 windows as one draw of 8
    common = dict(max_steps=4, loader="sliding", dropout=0.0)
    accum = train(tiny_cfg(tmp_path / "accum", batch_size=4, grad_accum_steps=2, **common))
    big = train(tiny_cfg(tmp_path / "big", batch_size=8, grad_accum_steps=1, **common))
    assert accum["tokens"] == big["tokens"] == 4 * 8 * 32
    torch.testing.assert_close(torch.tensor(accum["losses"]), torch.tensor(big["losses"]), rtol=1e-5, atol=1e-6)
    a = load_checkpoint(tmp_path / "accum" / "ckpt.pt")["model"]
    b = load_checkpoint(tmp_path / "big" / "ckpt.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        tiny_cfg("x", batch_size=0).validate()
    with pytest.raises(ValueError, match="lr must be > 0"):
        tiny_cfg("x", lr=0.0, min_lr=0.0).validate()
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        tiny_cfg("x", weight_decay=-0.1).validate()
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):  # would silently disable clipping
        tiny_cfg("x", grad_clip=-1.0).validate()
    with pytest.raises(ValueError, match="resume and overwrite"):
        tiny_cfg("x", resume=True, overwrite=True).validate()
    with pytest.raises(ValueError, match="min_lr"):
        tiny_cfg("x", lr=1e-4, min_lr=1e-3).validate()
    with pytest.raises(ValueError, match="loader"):
        tiny_cfg("x", loader="shuffled").validate()


def test_init_from_a_hugging_face_folder(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny")).save_pretrained(tmp_path / "hf")
    summary = train(tiny_cfg(tmp_path / "run", init_from=str(tmp_path / "hf"), max_steps=2, dropout=0.1))
    assert summary["steps"] == 2
    conf = load_checkpoint(tmp_path / "run" / "ckpt.pt")["model_config"]
    assert (conf["n_embd"], conf["block_size"], conf["dropout"]) == (64, 32, 0.1)  # cropped to the windows
    with pytest.raises(ValueError, match="n-layer"):
        train(tiny_cfg(tmp_path / "bad", init_from=str(tmp_path / "hf"), n_layer=3))


def test_fresh_run_refuses_to_clobber_a_run_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, max_steps=1))
    before = {name: file_digest(out / name) for name in ("ckpt.pt", "metrics.jsonl", "loss.png")}
    with pytest.raises(FileExistsError, match="ckpt.pt exists: pass --resume to continue it, --overwrite"):
        train(tiny_cfg(out, max_steps=1))
    assert {name: file_digest(out / name) for name in before} == before  # nothing touched
    stale = out / f".ckpt.pt.tmp-{2**22 + 1}"  # above Linux's pid_max: that writer is surely gone
    live = out / f".ckpt.pt.tmp-{os.getppid()}"  # a live process: maybe writing right now
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"in progress")

    summary = train(tiny_cfg(out, max_steps=2, overwrite=True))
    assert summary["steps"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]  # only the new run
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert not stale.exists() and live.exists()
    assert remove_stale_temps(out / "ckpt.pt") == []


def test_resume_config_takes_saved_settings_and_checks_changes(tmp_path):
    saved = dataclasses.asdict(tiny_cfg(tmp_path, batch_size=2, dropout=0.1, max_steps=10))
    cfg = resume_config(saved, {"out_dir": "elsewhere", "max_steps": 20})
    assert (cfg.batch_size, cfg.dropout, cfg.max_steps, cfg.out_dir, cfg.resume) == (2, 0.1, 20, "elsewhere", True)
    assert check_resume_config(saved, cfg) == {"max_steps": (10, 20)}
    for name, value, flag in [("batch_size", 4, "--batch-size"), ("data", "tinyshakespeare", "--data"),
                              ("dropout", 0.0, "--dropout"), ("seed", 1, "--seed")]:
        with pytest.raises(ValueError, match=f"{flag} cannot change when resuming.*{name}={saved[name]!r}.*{value!r}"):
            check_resume_config(saved, resume_config(saved, {name: value}))
    # batch_size is per process: 2 ranks x 2 then, 1 x 4 now is the same global batch
    assert check_resume_config(saved, resume_config(saved, {"batch_size": 4}), 2, 1) == {}


def test_splits_shorter_than_a_window_fail_early_and_say_so(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(train_setup, "build_model", no_model)
    with pytest.raises(ValueError, match=r"validation split has \d+ tokens \(val_fraction=0.002\), fewer than "
                                         r"block_size \+ 1 = 33; raise --val-fraction or lower --block-size"):
        train(tiny_cfg(tmp_path, val_fraction=0.002))
    with pytest.raises(ValueError, match=r"training split has \d+ tokens \(val_fraction=0.998\).*lower --val-fraction"):
        train(tiny_cfg(tmp_path, val_fraction=0.998))


# The val split has 16 windows of 32: 5 leaves a partial last batch; 20 is more than all of them.
@pytest.mark.parametrize("batch_size", [5, 20])
def test_evaluation_scores_each_val_window_at_most_once(tmp_path, monkeypatch, batch_size):
    eval_loaders = []
    real_next = TokenLoader.next_batch

    def spy(self):
        if not self.shuffle:  # the eval loaders
            eval_loaders.append(self)
        return real_next(self)

    monkeypatch.setattr(TokenLoader, "next_batch", spy)
    train(tiny_cfg(tmp_path, max_steps=1, batch_size=batch_size, eval_iters=100))
    assert eval_loaders
    for loader in set(eval_loaders):
        assert loader.step * loader.global_batch_size <= loader.n_windows  # never wrapped into epoch 2
        assert loader.step == max(1, loader.n_windows // loader.global_batch_size)  # every whole batch


def test_resume_on_another_world_size_gives_ranks_their_own_dropout(tmp_path):
    # A 1-process checkpoint resumed by rank 1 of 2: rank 0's saved state, then a torch reseed.
    seed = tiny_cfg(tmp_path).seed
    saved = capture_rng()
    restore_rank_rng([saved], rank=1, world_size=2, seed=seed, step=5)
    assert torch.initial_seed() == 7 + 1 + 5
    restore_rank_rng([saved], rank=0, world_size=2, seed=seed, step=5)
    assert torch.equal(torch.get_rng_state(), saved["torch"])  # rank 0 continues the saved stream


def test_metrics_rewrite_on_resume_is_durable(tmp_path, monkeypatch):
    import llm.train.checkpoint
    from llm.train.train_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.log(step=step, loss=float(step))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(llm.train.checkpoint.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    assert [r["step"] for r in MetricsLog(path, resume_step=2).records] == [1, 2]
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert synced  # written through the fsync-ing atomic writer, like the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp left


# --------------------------------------------------------------------- precision: fp16 with loss scaling

def test_float16_with_a_grad_scaler_learns_on_the_cpu(tmp_path, capsys):
    summary = train(tiny_cfg(tmp_path, max_steps=20, dtype="float16"))
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(r["loss_scale"] >= 1.0 for r in records) and sum(r["skipped"] for r in records) <= 2
    assert "precision: float16 autocast with dynamic loss scaling" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["grad_scaler"]["scale"] == records[-1]["loss_scale"]  # resumes with the same scale


def test_an_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, dtype="float16"), torch.device("cpu"), _one_process())
    trainer._train_step(1)  # let the scale settle below the fp16 limit
    trainer._train_step(2)
    scale = trainer.precision.scaler.get_scale()
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    adam_steps = {id(p): int(s["step"]) for p, s in trainer.optimizer.state.items()}
    head = trainer.raw_model.lm_head.weight
    handle = head.register_hook(lambda g: torch.full_like(g, float("inf")))  # one overflowing gradient
    record = trainer._train_step(3)
    handle.remove()
    assert record["skipped"] and record["grad_norm"] is None and math.isfinite(record["loss"])
    assert trainer.precision.scaler.get_scale() == scale / 2
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no parameter moved
    assert {id(p): int(s["step"]) for p, s in trainer.optimizer.state.items()} == adam_steps
    record = trainer._train_step(4)  # and the next step is a normal one
    assert not record["skipped"] and record["grad_norm"] is not None
    assert not all(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())


def _one_process():
    from llm.train import distributed

    return distributed.DistInfo()


def test_auto_precision_picks_bf16_then_fp16_then_fp32(monkeypatch):
    cpu = train_setup.choose_precision(torch.device("cpu"), "auto")
    assert cpu.name == "float32" and not cpu.scaler.is_enabled() and "auto: fp32 on cpu" in cpu.describe()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: types.SimpleNamespace(
        is_enabled=lambda: enabled))  # a real one on "cuda" would need a GPU
    t4 = train_setup.choose_precision(torch.device("cuda"), "auto")
    assert t4.name == "float16" and t4.scaler.is_enabled()
    assert t4.describe() == ("precision: float16 autocast with dynamic loss scaling (torch.amp.GradScaler) "
                             "(auto: Tesla T4, compute capability 7.5 has no bf16)")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
    a100 = train_setup.choose_precision(torch.device("cuda:0"), "auto")
    assert a100.name == "bfloat16" and not a100.scaler.is_enabled() and "has bf16" in a100.reason
    assert train_setup.choose_precision(torch.device("cpu"), "float16").scaler.is_enabled()
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        train_setup.choose_precision(torch.device("cpu"), "fp8")
