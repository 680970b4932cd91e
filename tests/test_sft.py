"""llm.finetune.sft end to end on a tiny model: the val loss falls, the outputs are written and load back."""
import argparse
import json

import pytest
import torch

from llm.train.checkpoint import FORMAT, atomic_save, load_checkpoint, load_model
from llm.finetune.common import config_from_args
from llm.finetune.instruct import load_records, split_records
from llm.model import GPT, GPTConfig
from llm.finetune.sft import SFTConfig, add_sft_args, run_sft, sft
from llm.tokenizer import get_tokenizer

# A tiny model on real records; sequences cut at 64 tokens (every prompt of the first 40 fits, so
# mask_prompt drops none) keep a step cheap: the (B*T, 50257) logits are most of the work.
TINY = dict(preset="tiny", limit=40, batch_size=4, max_length=64, device="cpu", progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cfg = SFTConfig(**TINY, max_steps=6, lr=5e-3, mask_prompt=True, eval_interval=3, eval_iters=1,
                    max_new_tokens=4, out_dir=str(out))
    return out, cfg, sft(cfg)


def test_short_run_lowers_validation_loss(run):
    out, _, summary = run
    assert summary["steps"] == 6 and len(summary["losses"]) == 6
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (34, 2, 4)
    # a fresh model starts near ln(50257) = 10.8; a few steps on the answers must take it well below
    assert summary["initial_val_loss"] > 10.0
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and evals[0]["val_loss"] == summary["initial_val_loss"]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert (out / "loss.png").stat().st_size > 0


def test_test_responses_are_the_test_split(run):
    out, _, _ = run
    _, _, test = split_records(load_records("instruction-data", limit=40))
    got = json.loads((out / "test_responses.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in got] == test
    assert all(isinstance(r["model_response"], str) for r in got)


def test_checkpoint_loads_as_a_plain_gpt(run):
    out, _, _ = run
    model = load_model(out / "ckpt.pt")
    assert isinstance(model, GPT) and model.config == GPTConfig.from_preset("tiny")
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["kind"] == "sft" and ckpt["finetune_config"]["mask_prompt"] is True and ckpt["step"] == 6
    assert ckpt["final_val_loss"] < ckpt["initial_val_loss"]


def test_existing_run_is_not_overwritten_silently(run):
    _, cfg, _ = run
    with pytest.raises(FileExistsError, match="--overwrite"):
        sft(cfg)


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="exactly one model"):
        sft(SFTConfig(limit=40, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="got --checkpoint, --preset"):
        SFTConfig(checkpoint="x.pt", preset="tiny").validate()
    with pytest.raises(ValueError, match="max_length"):
        SFTConfig(preset="tiny", max_length=1).validate()
    with pytest.raises(ValueError, match="1 records give 0 train"):
        sft(SFTConfig(preset="tiny", limit=1, device="cpu", progress=False, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="fewer than one step.s batch_size x grad_accum_steps x world size = 8 x 1 x 1"):
        sft(SFTConfig(preset="tiny", limit=5, device="cpu", progress=False, out_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []  # a run that cannot start writes nothing


def test_cli_lora_run_merges_into_a_plain_checkpoint(tmp_path):
    p = argparse.ArgumentParser()
    add_sft_args(p)
    args = p.parse_args(["--preset", "tiny", "--limit", "20", "--max-steps", "2", "--batch-size", "2",
                         "--max-length", "48", "--lr", "1e-2", "--lora-rank", "2", "--lora-alpha", "4",
                         "--eval-iters", "1", "--max-new-tokens", "2", "--num-test-responses", "1",
                         "--device", "cpu", "--no-progress", "--out-dir", str(tmp_path)])
    cfg = config_from_args(SFTConfig, args)  # untyped flags take the config's defaults
    assert cfg.lora_rank == 2 and cfg.merge_lora is True and cfg.mask_prompt is False
    assert run_sft(args) == 0
    merged = load_model(tmp_path / "ckpt.pt")
    torch.manual_seed(cfg.seed)
    start = GPT(GPTConfig.from_preset("tiny"))  # the preset's init, as the run drew it
    # LoRA touched only the block Linears: they moved, the embedding and LayerNorms did not
    sd, sd0 = merged.state_dict(), start.state_dict()
    assert set(sd) == set(sd0)
    assert not torch.equal(sd["transformer.h.0.attn.c_attn.weight"], sd0["transformer.h.0.attn.c_attn.weight"])
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_2.weight",
                 "transformer.h.0.attn.c_attn.bias"):
        assert torch.equal(sd[name], sd0[name]), name
    assert len(json.loads((tmp_path / "test_responses.json").read_text())) == 1


def test_start_model_from_hf_folder_and_checkpoint(tmp_path):
    from llm.train.checkpoint import FORMAT, atomic_save
    from llm.finetune.common import load_start_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32))
    model.save_pretrained(tmp_path / "hf")
    got, source = load_start_model(SFTConfig(hf_model=str(tmp_path / "hf"), block_size=16, dropout=0.1))
    assert source == {"hf_model": str(tmp_path / "hf")} and got.training
    assert (got.config.block_size, got.config.dropout) == (16, 0.1)
    assert torch.equal(got.transformer.wpe.weight, model.transformer.wpe.weight[:16])
    assert torch.equal(got.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)

    atomic_save({"format": FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict()},
                tmp_path / "ckpt.pt")
    got, source = load_start_model(SFTConfig(checkpoint=str(tmp_path / "ckpt.pt"), dropout=0.2))
    assert source["kind"] == "pretrain" and got.config.dropout == 0.2 and got.training
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_start_model(SFTConfig(hf_model=str(tmp_path / "nope")))


def test_a_checkpoint_trained_with_a_tokenizer_json_is_fine_tuned_with_it(hf_tokenizer_dir, tmp_path):
    tok = get_tokenizer(hf_tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16))
    start = tmp_path / "start.pt"
    atomic_save({"format": FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict(),
                 "tokenizer": tok.name}, start)
    run = dict(checkpoint=str(start), limit=20, batch_size=2, max_length=64, max_steps=2, eval_iters=1,
               max_new_tokens=2, num_test_responses=1, device="cpu", progress=False)
    sft(SFTConfig(**run, out_dir=str(tmp_path / "out")))  # no --tokenizer: the checkpoint's own
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["tokenizer"] == tok.name and ckpt["source"]["tokenizer"] == tok.name
    with pytest.raises(ValueError, match="vocab_size 300, fewer than the 50257 ids of tokenizer gpt2"):
        sft(SFTConfig(**run, tokenizer="gpt2", out_dir=str(tmp_path / "gpt2")))
