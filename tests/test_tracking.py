"""What a run reports: the MFU / FLOPs formula (llm/train/flops.py, shared with bench/train.py) and where the
metrics go (--logger: llm/train/tracking.py), read back from the TensorBoard event files and the wandb run."""
import torch

from llm.train.flops import flops_per_token, mfu_pct, peak_tflops
from llm.model import GPT, GPTConfig


def test_flops_per_token_by_hand():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg)
    n = model.num_parameters(non_embedding=True)
    # 6 N for the weights + 6 * n_layer * T * d_attn for causal q k^T and p v with backward
    assert flops_per_token(model, 16) == 6 * n + 6 * 2 * 16 * 16
    assert flops_per_token(model, 8) < flops_per_token(model, 16)


def test_mfu_pct_and_no_made_up_peak_on_cpu():
    assert peak_tflops(torch.device("cpu")) is None
    assert mfu_pct(1000.0, 1e9, None) is None
    assert abs(mfu_pct(1e3, 1e9, 100.0) - 1.0) < 1e-12  # 1e12 FLOP/s of a 1e14 FLOP/s peak


# ------------------------------------------------------------------------------ --logger (llm/train/tracking.py)

import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

from llm.train.tracking import WANDB_ID_FILE, WandbSink, parse_loggers  # noqa: E402
from llm.train.pretrain import TrainConfig, train  # noqa: E402
from llm.train.train_log import read_metrics  # noqa: E402

RUN = dict(preset="tiny", data="the-verdict", block_size=32, batch_size=2, max_steps=6, eval_interval=3,
           checkpoint_interval=3, eval_iters=2, sample_tokens=0, device="cpu", progress=False, seed=5)


def _event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard itself reads the folder (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class Crash(Exception):
    pass


def test_tensorboard_event_file_holds_every_step_once_across_a_crash_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = dict(RUN, out_dir=str(out), logger="tensorboard", peak_tflops=2.0)

    def crash_after_step_4(step, record):
        if step == 4:  # logged, but past the last checkpoint (step 3): the resumed run redoes it
            raise Crash

    with pytest.raises(Crash):
        train(TrainConfig(**cfg), on_step=crash_after_step_4)
    train(TrainConfig(**cfg, resume=True))

    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    tb = _event_scalars(out / "tensorboard")
    for key in ("loss", "lr", "grad_norm", "tok_per_s", "mfu_pct", "peak_mem_mb", "tokens"):
        logged = tb[f"train/{key}"]
        assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6], key  # the crashed run's step 4 was purged
        assert [v for _, v in logged] == pytest.approx([float(r[key]) for r in steps], rel=1e-6), key
    assert [s for s, _ in tb["eval/val_loss"]] == [0, 3, 6]
    assert [v for _, v in tb["eval/val_loss"]] == pytest.approx([r["val_loss"] for r in records if "val_loss" in r])
    fpt = flops_per_token(GPT(GPTConfig.from_preset("tiny", block_size=32)), 32)
    for r in steps:  # MFU is the shared formula at the given peak; memory is the process's peak RSS
        assert r["mfu_pct"] == pytest.approx(100 * r["tok_per_s"] * fpt / 2e12)
        assert r["peak_mem_mb"] > 50


def test_overwrite_starts_a_fresh_event_folder(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = dict(RUN, max_steps=2, eval_interval=0, out_dir=str(tmp_path), logger="tensorboard")
    train(TrainConfig(**cfg))
    train(TrainConfig(**cfg, overwrite=True))
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    assert [s for s, _ in _event_scalars(tmp_path / "tensorboard")["train/loss"]] == [1, 2]


def test_logger_names_are_checked_and_the_missing_package_named(monkeypatch, tmp_path):
    assert parse_loggers("tensorboard, wandb") == ("tensorboard", "wandb")
    with pytest.raises(ValueError, match="logger must be one or more of jsonl, tensorboard, wandb"):
        TrainConfig(logger="tensorbord").validate()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(TrainConfig(**dict(RUN, max_steps=1, out_dir=str(tmp_path), logger="tensorboard")))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbSink(tmp_path, {}, "p")


def test_wandb_sink_logs_offline_at_the_record_step_and_reopens_its_run(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = WandbSink(tmp_path, {"lr": 1e-3}, "proj")
    sink.log({"step": 1, "loss": 2.5, "lr": 1e-3, "skipped": False, "grad_norm": None})
    sink.log({"step": 1, "val_loss": 2.0})
    sink.log({"step": 2, "sample": "ROMEO: hi"})
    sink.close()
    init_kw = calls[0][1]
    assert init_kw["mode"] == "offline" and init_kw["dir"] == str(tmp_path) and init_kw["project"] == "proj"
    assert init_kw["config"] == {"lr": 1e-3} and (tmp_path / WANDB_ID_FILE).read_text().strip() == init_kw["id"]
    assert calls[1:] == [("log", {"train/loss": 2.5, "train/lr": 1e-3}, 1), ("log", {"eval/val_loss": 2.0}, 1),
                         ("log", {"samples": "ROMEO: hi"}, 2), ("finish",)]
    calls.clear()
    WandbSink(tmp_path, {}, "proj", resume_step=1)  # a resumed run continues the same wandb run
    assert calls[0][1]["id"] == init_kw["id"]
    monkeypatch.setenv("WANDB_MODE", "online")
    WandbSink(tmp_path / "other", {}, "proj")
    assert calls[-1][1]["mode"] == "online" and calls[-1][1]["id"] != init_kw["id"]


def test_a_real_offline_wandb_run_needs_no_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(TrainConfig(**dict(RUN, max_steps=2, eval_interval=0, out_dir=str(tmp_path), logger="wandb")))
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    (log,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    keys = (b"train/loss", b"train/tok_per_s", b"train/peak_mem_mb", b"eval/val_loss")
    # wandb's service process writes the run file after finish() has returned (CI once read only its
    # 7-byte header): wait for it, up to a minute
    deadline = time.monotonic() + 60
    while not all(key in (data := log.read_bytes()) for key in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    for key in keys:  # protobuf records: the keys are there verbatim
        assert key in data, key
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 2
