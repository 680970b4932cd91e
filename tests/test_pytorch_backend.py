"""The "pytorch" backend (PyTorch's own SDPA / F.layer_norm / F.cross_entropy) against the reference.

It is the baseline the benchmarks and bench/train.py compare our kernels with, so it must compute
the same function: forward and every gradient, including the two places where PyTorch's defaults
differ from the reference (bottom-right mask for Tq < Tk; loss 0 when every target is ignored).
"""
import pytest
import torch

import kernels
from kernels import reference


def _grads(out, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = out if isinstance(out, tuple) else (out,)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True)


def _compare(op, make_inputs, atol=2e-5, rtol=2e-5):
    a = make_inputs()
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in a]
    with kernels.backend("pytorch"):
        got = getattr(kernels, op)(*a)
    want = getattr(reference, op)(*b)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
    diff = [t for t in a if t.requires_grad]
    for g, w in zip(_grads(got, diff), _grads(want, [t for t in b if t.requires_grad])):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("Tq,Tk,D", [(1, 1, 16), (17, 17, 80), (5, 33, 64), (1, 40, 32)])
def test_attention(Tq, Tk, D):
    torch.manual_seed(Tq + Tk)
    _compare("causal_attention", lambda: [torch.randn(2, 3, T, D, requires_grad=True) for T in (Tq, Tk, Tk)])


@pytest.mark.parametrize("C", [1, 768, 1000])
def test_layer_norms(C):
    torch.manual_seed(C)
    x, r, w, b = (torch.randn(7, C) + 1.5, torch.randn(7, C), 1 + 0.5 * torch.randn(C), torch.randn(C))
    # C = 1: x - mean is exactly 0, so dx is 0 up to rounding amplified by rstd = 1/sqrt(eps) ~ 316
    atol = 1e-3 if C == 1 else 2e-5
    _compare("layer_norm", lambda: [t.clone().requires_grad_() for t in (x, w, b)], atol=atol)
    _compare("add_layer_norm", lambda: [t.clone().requires_grad_() for t in (x, r, w, b)], atol=atol)


@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_cross_entropies(ignored):
    torch.manual_seed(1)
    N, C, V = 9, 24, 50257
    targets = torch.randint(0, V, (N,))
    if ignored == "some":
        targets[::3] = -100
    elif ignored == "all":
        targets[:] = -100
    h, w = torch.randn(N, C), 0.05 * torch.randn(V, C)
    _compare("cross_entropy", lambda: [3 * torch.randn(N, V).requires_grad_(), targets])
    _compare("linear_cross_entropy", lambda: [h.clone().requires_grad_(), w.clone().requires_grad_(), targets], atol=1e-4)
    if ignored == "all":
        with kernels.backend("pytorch"):
            assert kernels.cross_entropy(torch.randn(N, V), targets).item() == 0.0  # not nan


def test_tiny_gpt_trains_the_same_on_pytorch_and_torch():
    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    losses = {}
    for name in ("torch", "pytorch"):
        model.zero_grad()
        with kernels.backend(name):
            _, loss = model(idx, targets)
        loss.backward()
        losses[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert losses["pytorch"][0] == pytest.approx(losses["torch"][0], abs=1e-5)
    for g, w in zip(losses["pytorch"][1], losses["torch"][1]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
