"""llm.scoring against a direct computation from the model's logits."""
import math

import pytest
import torch

from llm.model import GPT, GPTConfig
from llm.scoring import sequence_logprobs, token_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


def test_token_logprobs_match_softmax_of_logits(model):
    idx = torch.randint(0, 13, (2, 6))
    targets = torch.randint(0, 13, (2, 6))
    targets[0, :3] = -100  # e.g. a masked prompt
    with torch.no_grad():
        got = token_logprobs(model, idx, targets)
        logits, _ = model(idx)
    for b in range(2):
        for t in range(6):
            if targets[b, t] == -100:
                assert got[b, t] == 0
            else:
                row = logits[b, t].double()
                want = row[targets[b, t]] - math.log(row.exp().sum())
                assert got[b, t].item() == pytest.approx(want.item(), abs=1e-5)
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(model, idx, targets), got.sum(-1))
    # the loss the model computes is minus the mean of the same numbers
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(-(got.sum() / (targets != -100).sum()).item(), abs=1e-5)


def test_shape_mismatch_is_named(model):
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_logprobs(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
