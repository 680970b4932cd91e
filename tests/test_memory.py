"""Activation checkpointing (same loss and gradients, less memory) and the memory estimate that
training prints at start (close to what PyTorch's memory tracker measures; refusals name the flags)."""
from __future__ import annotations

import pytest
import torch

import kernels
from llm.train import memory
from llm.model import GPT, GPTConfig

pytest.importorskip("torch.distributed._tools.mem_tracker", reason="this torch has no MemTracker to measure with")


def _model(vocab=512, n_layer=4, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=n_layer, n_head=4, n_embd=64, dropout=dropout))


def _batch(vocab, B=4, T=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def _activations_measured(model, x, y, checkpointing):
    model.activation_checkpointing = checkpointing

    def step():
        _, loss = model(x, y)
        loss.backward()

    peak = memory.measure_peak(step, model)
    model.zero_grad(set_to_none=True)
    return peak - 2 * 4 * model.num_parameters()  # less the fp32 parameters and gradients


@pytest.mark.parametrize("backend", ["torch", "pytorch", "cuda"])
@pytest.mark.parametrize("vocab,precision", [(512, "float32"), (50257, "float32"), (50257, "bfloat16")])
def test_the_estimate_is_close_to_the_measured_peak(backend, vocab, precision):
    if kernels.available_backends("cpu")[backend]:
        pytest.skip(kernels.available_backends("cpu")[backend])
    model = _model(vocab, n_layer=6)
    x, y = _batch(vocab)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with kernels.backend(backend), autocast:
        est = memory.estimate_training_memory(model.config, model.num_parameters(), batch_size=4, block_size=64,
                                              precision=precision, ce_backend=backend, attention_backend=backend)
        for checkpointing in (False, True):
            measured = _activations_measured(model, x, y, checkpointing)
            estimated = est.activations(checkpointing)
            # never more than 20% short, at most 80% over (fixed costs weigh most at these small sizes)
            assert 0.8 < estimated / measured < 1.8, (checkpointing, estimated, measured)
    assert est.activations(True) < est.activations(False)


@pytest.mark.parametrize("backend", ["torch", "pytorch"])
@pytest.mark.parametrize("vocab,precision", [(512, "float32"), (50257, "bfloat16")])
@pytest.mark.parametrize("arch", [
    dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2, intermediate_size=172),  # Llama 3
    dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2, intermediate_size=192,
         head_dim=32, qk_norm=True),  # Qwen3: 4 heads of 32 > n_embd 64
], ids=["llama", "qwen3"])
def test_the_estimate_follows_gqa_head_dim_and_swiglu(backend, vocab, precision, arch):
    torch.manual_seed(0)
    # untied: the tied embedding's CPU gradient is sparse (llm.model.GPT._embed_tokens), and the memory
    # tracker cannot read a sparse tensor's storage
    model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=6, n_head=4, n_embd=64, tie_weights=False, **arch))
    x, y = _batch(vocab)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with kernels.backend(backend), autocast:
        est = memory.estimate_training_memory(model.config, model.num_parameters(), batch_size=4, block_size=64,
                                              precision=precision, ce_backend=backend, attention_backend=backend)
        for checkpointing in (False, True):
            measured = _activations_measured(model, x, y, checkpointing)
            estimated = est.activations(checkpointing)
            assert 0.8 < estimated / measured < 1.8, (checkpointing, estimated, measured)


def test_block_values_per_token():
    assert memory.block_values_per_token(GPTConfig(n_embd=64, n_head=4)) == 16 * 64  # GPT-2's 16 C
    llama = GPTConfig.from_preset("llama-tiny")  # 4C + (q + 2kv) + q + rotated (q + kv) + 3I
    assert memory.block_values_per_token(llama) == 4 * 128 + (128 + 2 * 64) + 128 + (128 + 64) + 3 * 344


# ----------------------------------------------------------------------------- activation checkpointing

def _loss_and_grads(model, x, y, checkpointing, seed=5):
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "pytorch", "cuda", "triton"])
def test_checkpointing_gives_the_same_loss_and_gradients(backend):
    if kernels.available_backends("cpu")[backend]:
        pytest.skip(kernels.available_backends("cpu")[backend])
    small = backend == "triton"  # Triton's interpreter is slow: a smaller model
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)) if small \
        else _model(vocab=512, n_layer=3, dropout=0.1)
    x, y = _batch(model.config.vocab_size, B=2, T=32)
    model.train()
    with kernels.backend(backend):
        loss, grads = _loss_and_grads(model, x, y, checkpointing=False)
        loss_ck, grads_ck = _loss_and_grads(model, x, y, checkpointing=True)
    assert torch.equal(loss, loss_ck)  # dropout redrawn identically in the recompute
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_checkpointing_compiles(arch):
    if arch == "gpt2":
        model = _model(vocab=128, n_layer=2)
    else:  # RoPE's angles, GQA, q/k norms and SwiGLU under torch.compile, checkpointed
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("qwen3-tiny", vocab_size=128, n_layer=2, block_size=64))
    x, y = _batch(128, B=2, T=16)
    loss, grads = _loss_and_grads(model, x, y, checkpointing=False)
    compiled = torch.compile(model)
    model.activation_checkpointing = True
    model.zero_grad(set_to_none=True)
    _, loss_ck = compiled(x, y)
    loss_ck.backward()
    torch.testing.assert_close(loss_ck.detach(), loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_lowers_the_measured_peak():
    model = _model(vocab=512, n_layer=6)
    x, y = _batch(512)
    full = _activations_measured(model, x, y, checkpointing=False)
    checkpointed = _activations_measured(model, x, y, checkpointing=True)
    assert checkpointed < 0.5 * full, (checkpointed, full)  # 6 blocks' activations -> their inputs + one block


def test_generation_ignores_checkpointing():
    model = _model(vocab=128, n_layer=2).eval()
    model.activation_checkpointing = True
    idx = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        logits, _ = model(idx)
    model.activation_checkpointing = False
    with torch.no_grad():
        assert torch.equal(model(idx)[0], logits)


# ----------------------------------------------------------------------------- the estimate in training

def test_training_prints_the_estimate_and_refuses_what_cannot_fit(tmp_path, monkeypatch, capsys):
    from llm.train.pretrain import TrainConfig, train

    cfg = dict(out_dir=str(tmp_path / "run"), data="the-verdict", preset="tiny", block_size=32, batch_size=4,
               max_steps=2, eval_iters=1, checkpoint_interval=0, sample_tokens=0, progress=False, device="cpu")
    train(TrainConfig(**cfg))
    out = capsys.readouterr().out
    assert "memory estimate: parameters 0.01 GiB + gradients 0.01 GiB + AdamW state 0.02 GiB + activations" in out
    assert "without activation checkpointing" in out and "of cpu's" in out

    monkeypatch.setattr(memory, "device_memory", lambda device: 64 << 20)  # a 64 MiB "device"
    with pytest.raises(ValueError) as info:
        train(TrainConfig(**{**cfg, "batch_size": 64}, overwrite=True, grad_accum_steps=2))
    msg = str(info.value)
    assert "more than cpu has" in msg and "--activation-checkpointing" in msg
    assert "--batch-size 32 --grad-accum-steps 4" in msg and "--no-memory-check" in msg
    assert train(TrainConfig(**cfg, overwrite=True, memory_check=False))["steps"] == 2  # the user's call

    monkeypatch.setattr(memory, "device_memory", lambda device: 10 << 30)
    summary = train(TrainConfig(**cfg, overwrite=True, activation_checkpointing=True))
    assert summary["steps"] == 2 and "(with activation checkpointing;" in capsys.readouterr().out


def test_fine_tuning_with_checkpointing_has_the_same_losses(tmp_path, monkeypatch):
    from llm.finetune.sft import SFTConfig, sft

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for ck in (False, True):
        cfg = SFTConfig(preset="tiny", limit=20, max_steps=3, batch_size=2, max_length=48, lora_rank=2, eval_iters=1,
                        max_new_tokens=1, num_test_responses=0, device="cpu", progress=False,
                        out_dir=str(tmp_path / str(ck)), activation_checkpointing=ck)
        runs[ck] = sft(cfg)["losses"]
        assert bool(calls) == ck
    assert len(runs[True]) == 3
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)
