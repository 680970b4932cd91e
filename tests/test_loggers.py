"""MFU / FLOPs formula (llm/flops.py), shared with bench/train.py."""
import torch

from llm.flops import flops_per_token, mfu_pct, peak_tflops
from llm.model import GPT, GPTConfig


def test_flops_per_token_by_hand():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg)
    n = model.num_parameters(non_embedding=True)
    # 6 N for the weights + 6 * n_layer * T * d_attn for causal q k^T and p v with backward
    assert flops_per_token(model, 16) == 6 * n + 6 * 2 * 16 * 16
    assert flops_per_token(model, 8) < flops_per_token(model, 16)


def test_mfu_pct_and_no_made_up_peak_on_cpu():
    assert peak_tflops(torch.device("cpu")) is None
    assert mfu_pct(1000.0, 1e9, None) is None
    assert abs(mfu_pct(1e3, 1e9, 100.0) - 1.0) < 1e-12  # 1e12 FLOP/s of a 1e14 FLOP/s peak
