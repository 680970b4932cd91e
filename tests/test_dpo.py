"""llm.finetune.dpo: the loss by hand, the batch layout, learning the preferences, and a CLI run end to end."""
import argparse
import contextlib
import copy
import json
import math

import pytest
import torch

from llm.train.checkpoint import FORMAT, atomic_save
from llm.finetune.dpo import (PREFERENCE_KEYS, DPOConfig, PreferenceDataset, add_dpo_args, collate_pairs, dpo_batch_loss,
                     dpo_loss, evaluate_pairs, run_dpo)
from llm.finetune.common import config_from_args, load_lora_checkpoint
from llm.finetune.instruct import load_records, split_records
from llm.finetune.lora import LoRALinear
from llm.model import GPT, GPTConfig
from llm.scoring import sequence_logprobs
from llm.tokenizer import get_tokenizer


def test_loss_matches_the_hand_computed_value():
    t = lambda v: torch.tensor([v])
    loss, stats = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    # chosen reward 0.1 * (-1 + 1.5) = 0.05, rejected 0.1 * (-2 + 1.5) = -0.05, margin 0.1
    want = -math.log(1.0 / (1.0 + math.exp(-0.1)))
    assert loss.item() == pytest.approx(want, abs=1e-7)
    assert stats["reward_margin"] == pytest.approx(0.1) and stats["accuracy"] == 1.0
    assert stats["chosen_reward"] == pytest.approx(0.05) and stats["rejected_reward"] == pytest.approx(-0.05)
    # two pairs: the mean of the per-pair losses; accuracy counts strictly positive margins only
    loss2, stats2 = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-1.5, -3.0]),
                             torch.tensor([-1.5, -3.0]), beta=0.1)
    assert loss2.item() == pytest.approx((want + math.log(2.0)) / 2, abs=1e-7)
    assert stats2["accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"four \(B,\) tensors"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_collate_pairs_layout():
    batch = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12])]  # (prompt, chosen, rejected)
    idx, targets = collate_pairs(batch, pad_token_id=0)
    # rows: prompt+chosen for each pair, then prompt+rejected; T = longest row - 1
    assert idx.tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [1, 2, 3, 0], [7, 11, 0, 0]]
    assert targets.tolist() == [[-100, -100, 4, 5], [8, 9, 10, -100], [-100, -100, 6, -100], [11, 12, -100, -100]]
    idx, targets = collate_pairs(batch, pad_token_id=0, allowed_max_length=2)
    assert idx.shape == targets.shape == (4, 2) and targets.tolist()[0] == [-100, -100]


def _toy_pairs(n=8, vocab=32):
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(1, vocab - 1, (k,), generator=g).tolist()
    return [(r(4), r(3), r(3)) for _ in range(n)]


def test_training_raises_margin_and_accuracy_from_exactly_zero():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    idx, targets = collate_pairs(_toy_pairs(), pad_token_id=31)
    loader = [(idx, targets)]
    nothing = contextlib.nullcontext
    start = evaluate_pairs(policy, reference, loader, 0.1, "cpu", nothing)
    assert start["reward_margin"] == 0.0 and start["accuracy"] == 0.0  # policy == reference, bit for bit
    assert start["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        policy.train()
        loss, _ = dpo_batch_loss(policy, reference, idx, targets, beta=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad()
    end = evaluate_pairs(policy, reference, loader, 0.1, "cpu", nothing)
    assert end["reward_margin"] > 0.1 and end["accuracy"] > 0.5 and end["loss"] < start["loss"]
    assert all(p.grad is None for p in reference.parameters())
    # the reference really stayed put: its log-probs are those of a fresh copy of the start
    torch.manual_seed(0)
    fresh = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(reference, idx, targets), sequence_logprobs(fresh, idx, targets))


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    """A tiny model saved in the pretraining format, standing in for an SFT checkpoint."""
    path = tmp_path_factory.mktemp("start") / "ckpt.pt"
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    atomic_save({"format": FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return path, model


def test_cli_run_with_unmerged_lora(start_checkpoint, tmp_path):
    path, start = start_checkpoint
    p = argparse.ArgumentParser()
    add_dpo_args(p)
    args = p.parse_args(["--checkpoint", str(path), "--limit", "20", "--max-steps", "3", "--batch-size", "2",
                         "--max-length", "64", "--lr", "1e-2", "--lora-rank", "2", "--no-merge-lora",
                         "--eval-iters", "1", "--eval-interval", "0", "--max-new-tokens", "2",
                         "--num-test-responses", "1", "--device", "cpu", "--no-progress", "--out-dir", str(tmp_path)])
    cfg = config_from_args(DPOConfig, args)  # untyped flags take the config's defaults
    assert cfg.beta == 0.1 and cfg.data == "instruction-data-with-preference" and cfg.merge_lora is False
    assert run_dpo(args) == 0
    assert not (tmp_path / "ckpt.pt").exists() and (tmp_path / "lora.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    for key in ("train_reward_margin", "val_reward_margin", "train_chosen_reward", "val_rejected_reward"):
        assert evals[0][key] == 0.0, key  # policy == reference before the first step
    assert evals[0]["train_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert evals[1]["train_reward_margin"] != 0.0
    steps = [r for r in records if "loss" in r and "step" in r and "reward_margin" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    responses = json.loads((tmp_path / "test_responses.json").read_text())
    assert len(responses) == 1 and {"chosen", "rejected", "model_response"} <= set(responses[0])

    # the factors go back onto the starting model and reproduce the trained policy's val reward margin
    model = load_lora_checkpoint(copy.deepcopy(start), tmp_path / "lora.pt")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * start.config.n_layer
    _, val, _ = split_records(load_records("instruction-data-with-preference", PREFERENCE_KEYS, limit=20))
    ds = PreferenceDataset(val, get_tokenizer())
    ds.keep_fitting(64)
    loader = [collate_pairs([ds[i] for i in range(min(2, len(ds)))], allowed_max_length=64)]
    got = evaluate_pairs(model, start.eval(), loader, 0.1, "cpu", contextlib.nullcontext)
    assert got["reward_margin"] != 0.0
    assert got["reward_margin"] == pytest.approx(evals[1]["val_reward_margin"], abs=1e-5)
    with pytest.raises(ValueError, match="config"):
        load_lora_checkpoint(GPT(GPTConfig.from_preset("tiny", n_layer=1)), tmp_path / "lora.pt")


def test_answers_end_with_the_tokenizers_own_end_of_text(hf_tokenizer_dir):
    tok = get_tokenizer(hf_tokenizer_dir)  # a tokenizer.json whose end-of-text id is 0, not GPT-2's 50256
    ds = PreferenceDataset(load_records("instruction-data-with-preference", PREFERENCE_KEYS, limit=3), tok)
    for _, chosen, rejected in ds.items:
        assert chosen[-1] == rejected[-1] == tok.eot_token == 0 and 0 not in chosen[:-1]
    idx, _ = collate_pairs(ds.items, pad_token_id=tok.eot_token)
    assert int(idx.max()) < tok.n_vocab


def test_dpo_batch_loss_through_chunked_scoring_matches_full_logits():
    """dpo_batch_loss scores with the chunked head: same loss and policy gradients as full logits."""
    from llm.model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=211, block_size=16, n_layer=1, n_head=2, n_embd=16))
    reference = copy.deepcopy(policy).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 211, (4, 9))
    targets = torch.randint(0, 211, (4, 9))
    targets[:, :3] = -100

    def full(model):
        lp = torch.log_softmax(model(idx)[0].float(), -1)
        safe = targets.clamp(min=0)
        return torch.where(targets != -100, lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0).sum(-1)

    loss, _ = dpo_batch_loss(policy, reference, idx, targets, beta=0.1)
    loss.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    with torch.no_grad():
        ref = full(reference)
    pol = full(policy)
    want_loss, _ = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], 0.1)
    want_loss.backward()
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-6)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
