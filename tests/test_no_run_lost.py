"""No run lost, no silent wrong resume, and a clear error instead of a traceback (issue 11, part 3).

Each test breaks one thing the way a user or a full disk does, and checks that the old run's files
survive, that the error names the file and says how to go on, and that nothing continues silently
on the wrong data.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llm.train.checkpoint import CheckpointError, RunLock, check_resumable, load_checkpoint
from llm.train.pretrain import train
from llm.train.train_log import read_metrics
from test_train import file_digest, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def _llm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def a_run(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, max_steps=3, checkpoint_interval=3))
    return out


def test_overwrite_with_a_bad_flag_deletes_nothing(a_run, tmp_path):
    before = {name: file_digest(a_run / name) for name in ("ckpt.pt", "metrics.jsonl")}
    with pytest.raises((FileNotFoundError, ValueError)):
        train(tiny_cfg(a_run, overwrite=True, data=str(tmp_path / "typo.txt")))
    with pytest.raises(ValueError):
        train(tiny_cfg(a_run, overwrite=True, block_size=4096))  # longer than the model's context
    assert {name: file_digest(a_run / name) for name in before} == before


def test_resume_on_data_edited_in_place_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = (ROOT / "README.md").read_text() * 3
    corpus.write_text(text)
    out = tmp_path / "run"
    train(tiny_cfg(out, data=str(corpus), max_steps=2, checkpoint_interval=2))
    corpus.write_text(text.replace("the", "teh"))  # same length, other tokens
    with pytest.raises(CheckpointError, match=r"training data changed.*corpus\.txt.*--overwrite"):
        train(tiny_cfg(out, data=str(corpus), max_steps=4, resume=True))
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2  # the saved run is untouched


def test_a_torn_last_metrics_record_is_dropped_and_the_run_resumes(a_run):
    with open(a_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')  # the disk filled mid-line
    with pytest.warns(UserWarning, match="dropped a torn last record"):
        train(tiny_cfg(a_run, max_steps=5, resume=True))
    assert [r["step"] for r in read_metrics(a_run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]


def test_a_bad_metrics_record_is_an_error_naming_the_file_and_line(a_run):
    lines = (a_run / "metrics.jsonl").read_text().splitlines()
    (a_run / "metrics.jsonl").write_text("\n".join([lines[0], '{"loss": 1.0}', *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: a record without \"step\""):
        train(tiny_cfg(a_run, max_steps=5, resume=True))
    (a_run / "metrics.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_metrics(a_run / "metrics.jsonl")


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(FileExistsError, match=rf"another run is writing to {out}.*pid {os.getpid()}"):
            train(tiny_cfg(out, max_steps=1))
    train(tiny_cfg(out, max_steps=1))  # released: the folder is usable again
    assert not (out / ".lock").exists()


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_last_checkpoint(a_run, monkeypatch):
    import shutil

    from llm.train import checkpoint

    good = file_digest(a_run / "ckpt.pt")

    def save_fails(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3200 vs 3114")

    monkeypatch.setattr(torch, "save", save_fails)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=rf"no space left on {a_run} while writing ckpt\.pt \(the previous ckpt\.pt is kept\)"):
        train(tiny_cfg(a_run, max_steps=6, checkpoint_interval=3, resume=True))
    assert file_digest(a_run / "ckpt.pt") == good


def test_prepare_cleans_the_work_folders_of_killed_prepares(tmp_path, monkeypatch):
    from llm import data

    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    tokens = tmp_path / "cache" / "tokens"
    dead = tokens / ".the-verdict-abc.tmp-999999999-x1"  # no such pid
    alive_proc = subprocess.Popen(["sleep", "30"])
    alive = tokens / f".the-verdict-abc.tmp-{alive_proc.pid}-x2"
    try:
        for folder in (dead, alive):
            folder.mkdir(parents=True)
            (folder / "train.bin").write_bytes(b"\0" * 10)
        data.prepare("the-verdict", progress=False)
        assert not dead.exists() and alive.exists()
    finally:
        alive_proc.kill()
        alive_proc.wait()


# ------------------------------------------------------------------------ clear errors, not tracebacks

def test_hf_sources_without_the_datasets_package_say_what_to_install():
    code = "import sys; sys.modules['datasets'] = None\nfrom llm.cli import main\nsys.exit(main(['prepare', 'hf:wikitext']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "needs the Hugging Face 'datasets' package: pip install datasets" in proc.stderr


@pytest.mark.parametrize("damage", ["model", "loader", "rng"])
def test_a_damaged_checkpoint_names_what_it_lacks(a_run, damage):
    ckpt = load_checkpoint(a_run / "ckpt.pt")
    if damage == "rng":
        ckpt["rng"] = []
    else:
        del ckpt[damage]
    torch.save(ckpt, a_run / "ckpt.pt")
    with pytest.raises(CheckpointError, match="empty" if damage == "rng" else f"no {damage}"):
        check_resumable(ckpt, a_run / "ckpt.pt")
    proc = _llm("pretrain", "--resume", "--out-dir", str(a_run), "--max-steps", "5", "--no-progress")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "cannot resume" in proc.stderr
    if damage == "model":
        proc = _llm("generate", "--checkpoint", str(a_run / "ckpt.pt"), "--prompt", "hi", "--max-new-tokens", "2")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "holds no model" in proc.stderr


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_a_pickle_that_would_run_code_is_refused_with_a_message(tmp_path):
    from llm.model import GPT

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                    "n_positions": 16, "vocab_size": 50257}))
    _Evil.marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte": _Evil()}, f)
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model\.bin: it is not a plain tensor file"):
        GPT.from_pretrained(str(folder))
    assert not _Evil.marker.exists()


def test_multiple_choice_items_of_the_wrong_type_are_named(tmp_path):
    from llm.eval.multiple_choice import from_hellaswag, load_items

    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"context": ["not", "a string"], "choices": [" a", " b"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="context must be a string"):
        load_items(str(path), "mc")
    record = {"ind": 7, "ctx_a": "He sat", "ctx_b": "down", "endings": "four letters", "label": 0}
    with pytest.raises(ValueError, match="HellaSwag record 7: endings must be a list of strings"):
        from_hellaswag(record)
    with pytest.raises(ValueError, match="ctx / ctx_a / ctx_b must be strings"):
        from_hellaswag({**record, "ctx_b": 3, "endings": ["a", "b"]})


@pytest.mark.parametrize("flags,message", [(["--timeout", "inf"], "the timeout must be"),
                                           (["--timeout", "1e300"], "the timeout must be"),
                                           (["--memory-mb", str(1 << 40)], "memory_bytes must be")])
def test_impossible_sandbox_limits_are_a_clear_error(flags, message):
    proc = _llm("eval", "humaneval", "--canonical", "--limit", "1", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


def test_a_perplexity_past_float_range_is_inf_not_an_overflow_error(monkeypatch):
    from llm.eval import perplexity as ppl
    from llm.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_preset("tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # (tied to the embedding) a mean loss of thousands of nats
    out = ppl.perplexity(model, torch.arange(200) % 50, block_size=32, progress=False)
    assert out["loss"] > 709 and out["perplexity"] == float("inf")


def test_generate_checks_its_settings_before_printing_anything(a_run):
    proc = _llm("generate", "--checkpoint", str(a_run / "ckpt.pt"), "--prompt", "hi", "--top-p", "1e-50",
                "--temperature", "0.8")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert "top_p 1e-50 underflows in float32" in proc.stderr and "Traceback" not in proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proc = _llm("generate", "--checkpoint", str(a_run / "ckpt.pt"), "--prompt", "hi", "--max-new-tokens", "3")
    assert proc.returncode == 0 and proc.stdout.startswith("hi")
