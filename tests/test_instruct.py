"""llm.finetune.instruct: the Alpaca prompt, record checks, splits, collate layout, and what masking does to the loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from llm.finetune.instruct import (EOT, InstructionDataset, collate, format_input, format_response, load_records,
                          prompt_ids, split_records)
from llm.model import GPT, GPTConfig
from llm.tokenizer import get_tokenizer

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def test_format_input_with_and_without_input():
    with_input = {"instruction": "Fix the spelling.", "input": "freind", "output": "friend"}
    assert format_input(with_input) == (PREAMBLE + "\n\n### Instruction:\nFix the spelling.\n\n### Input:\nfreind")
    no_input = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert format_input(no_input) == PREAMBLE + "\n\n### Instruction:\nName a color."
    assert format_response(no_input) == "\n\n### Response:\nBlue."


def test_dataset_tokens_are_prompt_then_response():
    tok = get_tokenizer()
    rec = {"instruction": "Name a color.", "input": "", "output": "Blue <|endoftext|> sky."}
    ds = InstructionDataset([rec], tok)
    ids, prompt_len = ds[0]
    assert prompt_len == len(tok.encode(format_input(rec)))
    assert tok.decode(ids) == format_input(rec) + format_response(rec)
    assert EOT not in ids  # a literal "<|endoftext|>" in the data is text, not the stop token
    assert ids[:len(prompt_ids(rec, tok))] == prompt_ids(rec, tok)  # generation sees the training prefix
    assert tok.decode(prompt_ids(rec, tok)).endswith("### Response:\n")


def test_load_records_from_registry_and_split_like_the_book():
    records = load_records("instruction-data")
    assert len(records) == 1100 and set(records[0]) == {"instruction", "input", "output"}
    train, val, test = split_records(records)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == records[:935] and test == records[935:1045] and val == records[1045:]
    assert load_records("instruction-data", limit=7) == records[:7]
    s1, s2 = split_records(records, seed=3), split_records(records, seed=3)
    assert s1 == s2 and s1[0] != train
    assert sorted(map(json.dumps, s1[0] + s1[1] + s1[2])) == sorted(map(json.dumps, records))


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    with pytest.raises(ValueError, match=r"record 1 is missing key\(s\) 'output'"):
        load_records(path)
    path.write_text(json.dumps([{"instruction": "a", "input": None, "output": "b"}]))
    with pytest.raises(ValueError, match="record 0 key 'input' must be a string"):
        load_records(path)
    path.write_text(json.dumps({"instruction": "a"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_records(path)
    with pytest.raises(FileNotFoundError, match="neither a known dataset"):
        load_records(tmp_path / "missing.json")


def test_collate_layout_matches_the_book():
    # The book's example batch (chapter 7): three token lists padded with 50256.
    x, y = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert y.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, -100, -100, -100], [8, 9, EOT, -100, -100]]
    assert x.dtype == y.dtype == torch.long


def test_collate_masks_the_prompt_and_truncates():
    batch = [([10, 11, 12, 20, 21], 3), ([13, 22], 1)]  # (ids, prompt_len)
    x, y = collate(batch, mask_prompt=True)
    assert x.tolist() == [[10, 11, 12, 20, 21], [13, 22, EOT, EOT, EOT]]
    # targets 0..prompt_len-2 predict prompt tokens: ignored; the first response target (20) is kept
    assert y.tolist() == [[-100, -100, 20, 21, EOT], [22, EOT, -100, -100, -100]]
    x, y = collate(batch, mask_prompt=True, allowed_max_length=3)
    assert x.tolist() == [[10, 11, 12], [13, 22, EOT]] and y.tolist() == [[-100, -100, 20], [22, EOT, -100]]
    x, y = collate(batch, pad_token_id=0)
    assert x.tolist()[1] == [13, 22, 0, 0, 0] and y.tolist()[1] == [22, 0, -100, -100, -100]
    with pytest.raises(ValueError, match="empty"):
        collate([])


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


def _loss_and_hidden_grad(model, x, y):
    """The model's own loss (fused head + loss kernel) and d loss / d final hidden states."""
    hidden = {}

    def keep(module, inputs, output):
        output.retain_grad()
        hidden["h"] = output

    handle = model.transformer.ln_f.register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
    finally:
        handle.remove()
    return loss.detach(), hidden["h"].grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_masked_targets_contribute_nothing(small_model):
    batch = [([1, 2, 3, 4, 5, 6, 7], 4), ([8, 9, 10], 2), ([11, 12, 13, 14], 3)]
    x, y = collate(batch, pad_token_id=63, mask_prompt=True)
    keep = y != -100
    loss, grad_h, grads = _loss_and_hidden_grad(small_model, x, y)

    # 1. the loss is the mean cross-entropy over the unmasked positions only (fp64 from the logits)
    with torch.no_grad():
        logits, _ = small_model(x)
    want = F.cross_entropy(logits.double()[keep], y[keep])
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    # 2. no gradient reaches the hidden state at a masked position: exactly zero, not just small
    assert grad_h[~keep].abs().max().item() == 0.0 and grad_h[keep].abs().sum() > 0
    # 3. the parameter gradients equal those of the loss written over the unmasked positions alone
    small_model.zero_grad(set_to_none=True)
    logits, _ = small_model(x)
    F.cross_entropy(logits[keep], y[keep]).backward()
    for name, p in small_model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)

    # 4. inputs whose own and later targets are all masked (the padding tail) change nothing at all:
    # the attention is causal, so they only reach masked positions.
    x2 = x.clone()
    x2[1, 3:] = torch.tensor([5, 17, 42, 0])  # row 1: ids 8 9 10 | EOT pad pad pad -> targets from 3 on are -100
    assert (y[1, 3:] == -100).all()
    loss2, grad_h2, grads2 = _loss_and_hidden_grad(small_model, x2, y)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad_h[keep], grad_h2[keep])
    for name in grads:
        torch.testing.assert_close(grads[name], grads2[name], atol=0, rtol=0, msg=name)


def test_fully_masked_batch_gives_zero_loss_not_nan(small_model):
    x, y = collate([([1, 2, 3], 3)], pad_token_id=63, mask_prompt=True, allowed_max_length=1)
    assert (y == -100).all()
    _, loss = small_model(x, y)
    assert loss.item() == 0.0
