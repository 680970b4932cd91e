"""``python -m llm``: prepare, pretrain, generate end to end in real subprocesses, plus help and errors."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from llm.cli import main
from llm.train.pretrain import TrainConfig


def llm(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})


TINY = ["--preset", "tiny", "--data", "the-verdict", "--block-size", "32", "--batch-size", "4", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = llm("pretrain", *TINY, "--max-steps", "8", "--eval-iters", "2", "--sample-tokens", "8",
               "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_prepare_prints_counts_and_paths():
    proc = llm("prepare", "the-verdict", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("the-verdict:") and "train" in first and "val" in first
    n_total = int(first.split(":")[1].split("tokens")[0].replace(",", ""))
    assert 4000 < n_total < 6000  # ~5.1k GPT-2 tokens
    train_path = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if "train_path" in line)
    assert os.path.getsize(train_path) == 2 * int(first.split("(")[1].split(" train")[0].replace(",", ""))
    assert any(line.startswith("  dir: ") for line in proc.stdout.splitlines())


def test_pretrain_reports_and_writes_outputs(trained):
    out, proc = trained
    assert "val loss before training" in proc.stdout and "unigram yardstick" in proc.stdout
    assert "--- sample at step 8 ---" in proc.stdout
    assert {"ckpt.pt", "metrics.jsonl", "loss.png"} <= {p.name for p in out.iterdir()}


def test_generate_streams_one_prompt_and_batches_several(trained):
    out, _ = trained
    ckpt = str(out / "ckpt.pt")
    one = llm("generate", "--checkpoint", ckpt, "--prompt", "I had always", "--max-new-tokens", "12",
              "--temperature", "0")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("I had always") and len(one.stdout) > len("I had always\n")
    two = llm("generate", "--checkpoint", ckpt, "--prompt", "I had always", "--prompt", "The", "--max-new-tokens",
              "12", "--temperature", "0")
    assert two.returncode == 0, two.stderr
    assert "=== [1/2] ===" in two.stdout and "=== [2/2] ===" in two.stdout
    # greedy decoding: the streamed text equals the batched one, piece for piece
    first_block = two.stdout.split("=== [1/2] ===\n")[1].split("\n=== [2/2]")[0]
    assert first_block == one.stdout.rstrip("\n")
    sampled = llm("generate", "--checkpoint", ckpt, "--max-new-tokens", "5", "--top-p", "0.9", "--seed", "3",
                  "--no-cache")
    assert sampled.returncode == 0 and sampled.stdout.startswith("ROMEO:")  # default: the run's sample prompt


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    proc = llm("generate", "--checkpoint", str(tmp_path / "nope" / "ckpt.pt"))
    assert proc.returncode == 2
    assert "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr


def test_pretrain_help_lists_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps (and hyphen-splits) at the terminal width
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "--max-steps MAX_STEPS optimizer steps (the cosine schedule ends here) (default: 500)" in text
    assert "(default: cpu-small)" in text and "--resume, --no-resume" in text and "{auto,torch,pytorch,triton,cuda}" in text
    assert text.count("(default:") >= len(fields(TrainConfig))


def test_every_command_that_tokenizes_takes_a_tokenizer(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    for command in (["prepare"], ["pretrain"], ["generate"], ["sft"], ["dpo"], ["eval", "perplexity"], ["eval", "mc"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--tokenizer" in text and "Hugging Face tokenizer.json" in text, command


def test_bad_values_exit_2_without_traceback(tmp_path, capsys):
    assert main(["pretrain", *TINY, "--batch-size", "0", "--out-dir", str(tmp_path)]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err
    assert main(["pretrain", *TINY, "--resume", "--out-dir", str(tmp_path / "none")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_non_finite_loss_exits_nonzero(tmp_path, capsys):
    # An absurd learning rate overflows the weights after one update; the loss turns NaN.
    code = main(["pretrain", *TINY, "--max-steps", "20", "--lr", "1e30", "--min-lr", "0", "--warmup-steps", "0",
                 "--grad-clip", "0", "--sample-tokens", "0", "--checkpoint-interval", "1", "--out-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step" in err and "Traceback" not in err


RESUME_RUN = [*TINY, "--batch-size", "2", "--grad-accum-steps", "2", "--dropout", "0.1", "--loader", "sliding",
              "--seed", "5", "--max-steps", "4", "--lr", "3e-3", "--warmup-steps", "2", "--eval-iters", "2",
              "--eval-interval", "0", "--sample-tokens", "0", "--checkpoint-interval", "2"]


def test_resume_continues_the_run_with_its_own_settings(tmp_path, monkeypatch, capsys):
    from llm.train.pretrain import Trainer
    from llm.train.train_log import read_metrics, step_losses

    assert main(["pretrain", *RESUME_RUN, "--out-dir", str(tmp_path / "full")]) == 0
    real_after_step = Trainer._after_step

    def crash_after_3(self, record):
        real_after_step(self, record)
        if record["step"] == 3:
            raise KeyboardInterrupt  # a Ctrl-C after step 3: the checkpoint of step 2 is on disk

    split = str(tmp_path / "split")
    monkeypatch.setattr(Trainer, "_after_step", crash_after_3)
    assert main(["pretrain", *RESUME_RUN, "--out-dir", split]) == 130
    monkeypatch.setattr(Trainer, "_after_step", real_after_step)
    capsys.readouterr()

    # A setting that decides the data stream cannot change: a clear error naming it, nothing run.
    assert main(["pretrain", "--resume", "--out-dir", split, "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size cannot change when resuming" in err and "batch_size=2" in err and "asks for 4" in err
    # Only --resume and --out-dir: everything else (preset, data, batch, dropout, seed...) comes from the checkpoint.
    assert main(["pretrain", "--resume", "--out-dir", split]) == 0
    assert "resumed from" in capsys.readouterr().out
    full = step_losses(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert len(full) == 4
    assert step_losses(read_metrics(tmp_path / "split" / "metrics.jsonl")) == full  # bitwise


def test_fresh_pretrain_into_a_used_out_dir_needs_overwrite(trained, capsys):
    out, _ = trained
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out-dir", str(out)]) == 2
    assert "ckpt.pt exists: pass --resume to continue it, --overwrite to start over" in capsys.readouterr().err
