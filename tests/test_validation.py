"""Bad inputs to every op raise a TypeError/ValueError that names the argument and the problem."""
import pytest
import torch

import kernels

q = torch.randn(2, 3, 5, 8)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((q.numpy(), q, q), TypeError, "q must be a torch.Tensor"),
        ((q[0], q, q), ValueError, r"q must be 4-D .*shape \(3, 5, 8\)"),
        ((q.long(), q, q), TypeError, "q must be a floating-point tensor"),
        ((q, q.double(), q), TypeError, "share one dtype"),
        ((q, q, q[:, :, :4]), ValueError, "k and v must have the same shape"),
        ((q, q[:, :2], q[:, :2]), ValueError, r"q's 3 heads must be a multiple of k/v's 2"),  # GQA: H % H_kv
        ((q, q[:1], q[:1]), ValueError, "agree in batch and head dim"),
        ((q, q[:, :, :4], q[:, :, :4]), ValueError, r"Tq=5 > Tk=4"),
        ((q, q, q, -1.0), ValueError, "scale must be a finite positive number"),
        ((q, q, q, "0.1"), TypeError, "scale must be a real number"),
        ((q[:, :, :0], q, q), ValueError, "q must not be empty"),
    ],
)
def test_attention_rejects(args, error, pattern):
    with pytest.raises(error, match=pattern):
        kernels.causal_attention(*args)


def test_attention_rejects_mixed_devices():
    with pytest.raises(ValueError, match="same device.*k on meta"):
        kernels.causal_attention(q, q.to("meta"), q)


x = torch.randn(4, 6)
w, b = torch.ones(6), torch.zeros(6)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((x.int(), w, b), TypeError, "x must be a floating-point tensor"),
        ((x, torch.ones(5), b), ValueError, r"weight must have shape \(6,\).*shape \(5,\)"),
        ((x, w, torch.zeros(1, 6)), ValueError, r"bias must have shape \(6,\)"),
        ((x, w, None), TypeError, "bias must be a torch.Tensor, got NoneType"),
        ((x, w, b, 0.0), ValueError, "eps must be a finite positive number"),
        ((torch.randn(4, 0), torch.ones(0), torch.zeros(0)), ValueError, "non-empty last dimension"),
    ],
)
def test_layer_norm_rejects(args, error, pattern):
    with pytest.raises(error, match=pattern):
        kernels.layer_norm(*args)


logits = torch.randn(4, 7)
targets = torch.tensor([0, 6, -100, 2])


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((logits[0], targets[:1]), ValueError, r"logits must be \(N, V\)"),
        ((logits, targets.float()), TypeError, "targets must be a integer tensor"),
        ((logits, targets[:3]), ValueError, r"targets must have shape \(4,\)"),
        ((logits, torch.tensor([0, 7, 1, 2])), ValueError, r"\[0, 7\).*found 7 at flat position 1"),
        ((logits, torch.tensor([0, -5, 1, 2])), ValueError, "found -5"),
        ((logits, targets, 1.5), TypeError, "ignore_index must be an int"),
    ],
)
def test_cross_entropy_rejects(args, error, pattern):
    with pytest.raises(error, match=pattern):
        kernels.cross_entropy(*args)


h = torch.randn(4, 6)
W = torch.randn(7, 6)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        ((h, W[:, :5], targets), ValueError, r"must match hidden's last dim C = 6"),
        ((h, W.double(), targets), TypeError, "hidden is torch.float32, weight is torch.float64"),
        ((h, W[0], targets), ValueError, r"weight must be a non-empty \(V, C\)"),
        ((h, W, targets[:2]), ValueError, r"targets must have shape \(4,\)"),
        ((h, W, torch.tensor([0, 1, 2, 9])), ValueError, "found 9"),
    ],
)
def test_linear_cross_entropy_rejects(args, error, pattern):
    with pytest.raises(error, match=pattern):
        kernels.linear_cross_entropy(*args)


def test_add_layer_norm_rejects():
    with pytest.raises(ValueError, match=r"add_layer_norm: residual must have x's shape \(4, 6\)"):
        kernels.add_layer_norm(x, x[:2], w, b)
    with pytest.raises(TypeError, match="add_layer_norm: tensors must share one dtype"):
        kernels.add_layer_norm(x, x.double(), w, b)
    with pytest.raises(ValueError, match=r"add_layer_norm: weight must have shape \(6,\)"):
        kernels.add_layer_norm(x, x, torch.ones(5), b)
