"""Model level: a seeded tiny GPT on the Triton backend matches the torch backend.

Same logits, loss and every parameter gradient (fp32; on the CPU the kernels run in Triton's
interpreter, see tests/conftest.py), with ignored targets in the batch and an odd sequence length.
"""
import pytest
import torch

import kernels
from llm.model import GPT, GPTConfig

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(backend: str, model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    model.zero_grad(set_to_none=True)
    with kernels.backend(backend):
        logits, loss = model(idx, targets, return_logits=True)
        loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def test_tiny_gpt_triton_matches_torch():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)  # head dim 16
    model = GPT(cfg).to(DEVICE)
    B, T = 2, 19
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=DEVICE)
    targets[0, :5] = -100  # prompt-style masking: ignored positions

    ref_logits, ref_loss, ref_grads = run("torch", model, idx, targets)
    tri_logits, tri_loss, tri_grads = run("triton", model, idx, targets)

    torch.testing.assert_close(tri_logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert ref_grads.keys() == tri_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"grad of {name}: {m}")
