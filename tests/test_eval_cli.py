"""llm.eval.cli: ``llm eval <task>`` on a tiny checkpoint writes the results JSON and prints a table."""
import argparse
import json

import pytest
import torch

from llm.train.checkpoint import FORMAT, CheckpointError, load_model
from llm.data import fetch_corpus
from llm.eval.cli import add_eval_args, run_eval
from llm.eval.perplexity import perplexity
from llm.model import GPT, GPTConfig
from llm.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # The GPT-2 vocabulary (the CLI tokenizes with it) but a narrow model, so the 50257-wide head is cheap.
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    torch.save({"format": FORMAT, "step": 7, "model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return path


def _run(argv):
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    return run_eval(parser.parse_args(argv))


def test_perplexity_on_the_verdict(ckpt, capsys):
    assert _run(["perplexity", "the-verdict", "--checkpoint", str(ckpt), "--limit", "300", "--stride", "16",
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    result = json.loads((ckpt.parent / "eval_perplexity.json").read_text())
    assert result["task"] == "perplexity" and result["model"]["step"] == 7
    assert result["config"]["block_size"] == 32 and result["config"]["stride"] == 16
    # the same number as the library computes on the first 300 tokens of the story
    tokens = get_tokenizer().encode(fetch_corpus("the-verdict").read_text())[:300]
    want = perplexity(load_model(ckpt), tokens, stride=16, progress=False)
    assert result["metrics"]["tokens"] == 299
    assert result["metrics"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert "perplexity" in table and f"loss        {want['loss']:.4f}" in table
    assert result["timing"]["seconds"] >= 0


def test_gsm8k_limit_2_writes_per_item_predictions(ckpt, tmp_path, capsys):
    out = tmp_path / "sub" / "gsm.json"
    assert _run(["gsm8k", "--checkpoint", str(ckpt), "--limit", "2", "--n-shot", "1", "--max-new-tokens", "4",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["n"] == 2 and result["config"]["n_shot"] == 1
    assert [it["gold"] for it in result["items"]] == ["18", "3"]
    assert all({"prediction", "completion", "correct"} <= set(it) for it in result["items"])
    assert "accuracy" in capsys.readouterr().out


def test_mc_and_humaneval_canonical(ckpt, tmp_path, capsys, monkeypatch):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"context": f"{i} plus one is", "choices": [" one", " two"], "label": i % 2})
                               for i in range(4)))
    assert _run(["mc", str(items), "--checkpoint", str(ckpt), "--n-shot", "1", "--no-progress"]) == 0
    result = json.loads((ckpt.parent / "eval_mc.json").read_text())
    assert result["metrics"]["n"] == 4 and len(result["items"]) == 4
    monkeypatch.chdir(tmp_path)
    assert _run(["humaneval", "--canonical", "--limit", "2", "--no-progress"]) == 0
    result = json.loads((tmp_path / "eval_humaneval.json").read_text())
    assert result["metrics"]["pass@1"] == 1.0 and result["metrics"]["problems"] == 2
    assert "pass@1" in capsys.readouterr().out


def test_errors_name_the_problem(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        _run(["perplexity", "the-verdict", "--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(FileNotFoundError, match="--hf-model"):
        _run(["perplexity", "the-verdict", "--hf-model", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        _run(["gsm8k", "--checkpoint", str(ckpt), "--limit", "0"])
    with pytest.raises(SystemExit):  # argparse: one model source only
        _run(["gsm8k", "--checkpoint", str(ckpt), "--hf-model", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: a task is required
        _run([])


def test_on_windows_humaneval_alone_fails_with_the_reason(ckpt, tmp_path, monkeypatch):
    # What Windows lacks for running model code: the `resource` module and process groups.
    import sys
    import os

    import llm.eval.sandbox as sandbox
    from llm.cli import main

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    monkeypatch.delattr(os, "killpg")
    monkeypatch.setattr(sys, "platform", "win32")
    sampled = []
    monkeypatch.setattr("llm.eval.humaneval.evaluate_humaneval", lambda *a, **k: sampled.append(1))
    for unsafe in ([], ["--unsafe-no-sandbox"]):
        with pytest.raises(sandbox.SandboxUnavailable, match="needs a Unix sandbox: win32 has no Unix rlimits.*WSL2"):
            _run(["humaneval", "--checkpoint", str(ckpt), "--limit", "1", "--no-progress", *unsafe])
    assert not sampled  # refused before any sampling
    with pytest.raises(sandbox.SandboxUnavailable, match="needs a Unix sandbox"):
        sandbox.run_programs(["print(1)"], sandbox.Limits(sandbox="unsafe"), progress=False)
    # the CLI says it in one line and exits non-zero
    assert main(["eval", "humaneval", "--canonical", "--limit", "1", "--out", str(tmp_path / "he.json")]) == 1
    # every other task still runs
    out = tmp_path / "ppl.json"
    assert _run(["perplexity", "the-verdict", "--checkpoint", str(ckpt), "--limit", "100", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["metrics"]["tokens"] == 99
