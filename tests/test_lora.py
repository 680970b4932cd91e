"""llm.finetune.lora: identity at init, only the factors learn, merging changes no logit, the count formula."""
import pytest
import torch
import torch.nn as nn

from llm.finetune.lora import (LoRALinear, apply_lora, count_parameters, describe_trainable, load_lora_state_dict,
                      lora_state_dict, merge_lora)
from llm.model import GPT, GPTConfig

CFG = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


def make_model(**over) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CFG, **over})).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 12), generator=g), torch.randint(0, 97, (2, 12), generator=g)


def randomize_b(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)


def test_fresh_lora_changes_no_output():
    model = make_model()
    x, _ = batch()
    with torch.no_grad():
        before, _ = model(x)
        apply_lora(model, rank=4, alpha=8)
        after, _ = model(x)
    assert torch.equal(before, after)  # B = 0: the update is exactly zero
    lin = model.transformer.h[0].attn.c_attn
    assert isinstance(lin, LoRALinear) and lin.scaling == 2.0 and lin.lora_A.abs().sum() > 0
    assert lin.lora_A.shape == (4, 32) and lin.lora_B.shape == (96, 4)


def test_trainable_count_is_the_formula_and_reported():
    model = make_model()
    total = count_parameters(model)
    r, C, L = 4, CFG["n_embd"], CFG["n_layer"]
    n = apply_lora(model, rank=r, alpha=8)
    # per block: c_attn C->3C, attn c_proj C->C, c_fc C->4C, mlp c_proj 4C->C; each adds r * (in + out)
    assert n == L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert count_parameters(model) == total + n
    assert describe_trainable(model) == f"trainable parameters: {n:,} of {total + n:,} ({100 * n / (total + n):.2f}%)"
    only_attn = make_model()
    assert apply_lora(only_attn, rank=2, alpha=2, targets="c_attn") == L * 2 * (C + 3 * C)


def test_only_lora_factors_get_gradients():
    model = make_model()
    apply_lora(model, rank=4, alpha=8)
    model.train()
    x, y = batch()
    _, loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # with B = 0 only B's gradient is non-zero at the first step (A's flows through B)
    lin = model.transformer.h[1].mlp.c_fc
    assert lin.lora_B.grad.abs().sum() > 0 and lin.lora_A.grad.abs().sum() == 0


def test_merge_gives_the_same_logits_and_a_plain_gpt():
    model = make_model()
    apply_lora(model, rank=4, alpha=16)
    randomize_b(model)
    x, y = batch()
    with torch.no_grad():
        want, _ = model(x, y, return_logits=True)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got, _ = model(x, y, return_logits=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the merged model is a standard GPT: its state dict loads into a fresh one
    fresh = GPT(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], want, atol=1e-5, rtol=0)
    assert set(fresh.state_dict()) == set(make_model().state_dict())


def test_lm_head_lora_trains_through_the_fused_loss_and_unties_on_merge():
    model = make_model()
    wte = model.transformer.wte.weight.detach().clone()
    apply_lora(model, rank=2, alpha=2, targets=("lm_head",))
    head = model.lm_head
    assert head.base.weight is model.transformer.wte.weight  # still the tied tensor, frozen
    x, y = batch()
    _, loss = model(x, y)  # the fused head + loss reads lm_head.weight, the effective weight
    loss.backward()
    assert head.lora_B.grad.abs().sum() > 0
    randomize_b(model)
    with torch.no_grad():
        want, _ = model(x)
    merge_lora(model)
    assert model.config.tie_weights is False and model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding itself is untouched
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], want, atol=1e-5, rtol=0)


def test_factors_round_trip():
    a = make_model()
    apply_lora(a, rank=3, alpha=6, targets="c_attn,c_fc")
    randomize_b(a)
    state = lora_state_dict(a)
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    b = make_model()
    apply_lora(b, rank=3, alpha=6, targets="c_attn,c_fc")
    load_lora_state_dict(b, state)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])
    c = make_model()
    apply_lora(c, rank=3, alpha=6, targets="c_attn")
    with pytest.raises(ValueError, match="do not match"):
        load_lora_state_dict(c, state)


def test_bad_arguments_are_named():
    model = make_model()
    with pytest.raises(ValueError, match="q_proj.*match no nn.Linear.*c_attn"):
        apply_lora(model, rank=4, alpha=8, targets=("c_attn", "q_proj"))
    apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1, alpha=1)
