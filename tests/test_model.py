"""The GPT model: configs, parameter counts, initialisation, forward/loss semantics, kernel API use."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
import llm.model
from llm.model import GPT, PRESETS, GPTConfig, KVCache, LayerNorm


V_SMALL = 97  # a prime vocab keeps the tiny test models fast and catches V/C mix-ups


def small_config(**kw) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **{"vocab_size": V_SMALL, **kw})


def expected_num_params(cfg: GPTConfig) -> int:
    """GPT-2's parameter count from its shapes: embeddings + n_layer blocks + ln_f (+ untied head)."""
    V, T, L, C = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    # per block: ln_1 2C, c_attn 3C^2 + 3C, attn c_proj C^2 + C, ln_2 2C, c_fc 4C^2 + 4C, mlp c_proj 4C^2 + C
    per_block = 12 * C * C + 13 * C if cfg.bias else 12 * C * C + 2 * C
    n = V * C + T * C + L * per_block + (2 * C if cfg.bias else C)
    return n if cfg.tie_weights else n + V * C


# ---- config -----------------------------------------------------------------------------------


def test_presets_and_round_trip():
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "cpu-small"} <= set(PRESETS)
    shape = lambda name: tuple(PRESETS[name][k] for k in ("n_layer", "n_head", "n_embd"))  # noqa: E731
    assert shape("gpt2") == (12, 12, 768) and shape("gpt2-medium") == (24, 16, 1024)
    assert shape("gpt2-large") == (36, 20, 1280) and shape("gpt2-xl") == (48, 25, 1600)
    cfg = GPTConfig.from_preset("cpu-small", dropout=0.1)
    assert cfg.n_layer == 4 and cfg.dropout == 0.1
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=65, n_head=2), "n_embd"),
        (dict(n_head=0), "n_head"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(n_layer=1.5), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(bias="yes"), "bias"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_from_preset_errors():
    with pytest.raises(ValueError, match="gpt2-medium"):  # the message lists the presets
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="n_embed"):
        GPTConfig.from_preset("tiny", n_embed=32)
    with pytest.raises(ValueError, match="colour"):
        GPTConfig.from_dict({"colour": 1})


# ---- parameter counts and initialisation ------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_of_every_preset(name):
    cfg = GPTConfig.from_preset(name)
    with torch.device("meta"):  # shapes only: gpt2-xl costs nothing
        model = GPT(cfg)
    assert model.num_parameters() == expected_num_params(cfg)
    if name == "gpt2":
        assert model.num_parameters() == 124_439_808
        assert model.num_parameters(non_embedding=True) == 124_439_808 - 1024 * 768


@pytest.mark.parametrize("kw", [dict(tie_weights=False), dict(bias=False), dict(bias=False, tie_weights=False)])
def test_parameter_count_variants(kw):
    cfg = GPTConfig.from_preset("gpt2", **kw)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_parameters() == expected_num_params(cfg)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


def test_module_names_match_gpt2():
    names = {n for n, _ in GPT(small_config()).named_parameters()}
    for name in [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
        "transformer.h.1.ln_1.weight", "transformer.h.1.ln_1.bias", "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.bias", "transformer.h.1.attn.c_proj.weight", "transformer.h.1.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.bias",
    ]:
        assert name in names
    assert "lm_head.weight" in GPT(small_config()).state_dict()


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu-small")  # enough weights for tight std estimates
    model = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name


def test_tied_and_untied_weights():
    model = GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    untied = GPT(small_config(tie_weights=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_parameters() == model.num_parameters() + V_SMALL * 64
    # untie_weights keeps the function but gives the head its own storage
    idx = torch.randint(0, V_SMALL, (1, 8))
    before = model(idx)[0]
    model.untie_weights()
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert not model.config.tie_weights
    torch.testing.assert_close(model(idx)[0], before)


@pytest.mark.parametrize("tie", [True, False])
def test_embedding_gradient_is_dense_and_equals_the_dense_lookups(monkeypatch, tie):
    """On the CPU the tied lookup's gradient is sparse inside autograd (llm.model.GPT._embed_tokens);
    what reaches .grad must still be one dense tensor with the same values as the dense lookup gives,
    over two accumulated micro-batches."""
    def grads(sparse_allowed: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(small_config(tie_weights=tie))
        g = torch.Generator().manual_seed(1)
        seen = []
        real_embedding = F.embedding

        def embedding(idx, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                      sparse=False):
            if weight is model.transformer.wte.weight:
                seen.append(sparse)
            return real_embedding(idx, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                                  sparse and sparse_allowed)

        monkeypatch.setattr(llm.model.F, "embedding", embedding)
        for _ in range(2):
            idx = torch.randint(0, V_SMALL, (2, 16), generator=g)
            model(idx, idx.roll(1, 1))[1].backward()
        monkeypatch.undo()
        assert seen == [tie, tie]  # sparse exactly when tied (on the CPU)
        return {n: p.grad for n, p in model.named_parameters()}

    sparse, dense = grads(True), grads(False)
    for name, g in sparse.items():
        assert g.layout == torch.strided and g.is_contiguous(), name
        torch.testing.assert_close(g, dense[name], rtol=1e-6, atol=1e-7, msg=name)


# ---- forward and loss -------------------------------------------------------------------------


def test_forward_shapes_and_loss_at_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))  # the real 50257 vocab
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 50257) and loss is None
    logits, loss = model(idx, targets)
    assert logits is None and loss.dim() == 0
    # small random logits: the prediction is nearly uniform, so the loss is about ln(V)
    assert loss.item() == pytest.approx(math.log(50257), abs=0.1)


def test_last_only_gives_the_last_positions_logits():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, V_SMALL, (2, 9))
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
    assert full.shape == (2, 9, V_SMALL) and last.shape == (2, 1, V_SMALL)
    torch.testing.assert_close(last, full[:, -1:, :], atol=1e-6, rtol=1e-6)


def test_loss_equals_log_softmax_of_logits():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, V_SMALL, (3, 11))
    targets = torch.randint(0, V_SMALL, (3, 11))
    targets[0, :4] = -100
    targets[2, 7] = -100
    logits, loss = model(idx, targets, return_logits=True)
    assert logits.shape == (3, 11, V_SMALL)
    keep = targets != -100
    logp = torch.log_softmax(logits.double(), dim=-1)[keep]  # (N, V)
    expected = -logp.gather(1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # a different ignore_index
    t2 = targets.clone()
    t2[t2 == -100] = 5
    _, loss2 = model(idx, t2, ignore_index=5)
    keep2 = t2 != 5
    expected2 = -torch.log_softmax(logits.double(), -1)[keep2].gather(1, t2[keep2][:, None]).mean()
    assert loss2.item() == pytest.approx(expected2.item(), abs=1e-5)
    # everything ignored: zero, not nan
    _, loss3 = model(idx, torch.full_like(targets, -100))
    assert loss3.item() == 0.0


def test_too_long_sequence_raises():
    model = GPT(small_config(block_size=8))
    with pytest.raises(ValueError, match=r"9.*block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(model.config.n_layer)
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=r"3 \+ kv cache length 6.*block_size 8"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, V_SMALL, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.config.n_layer)
    parts = [model(idx[:, :5], kv_cache=cache)[0]]
    for t in range(5, 12):  # one token at a time, positions offset by the cache length
        parts.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    assert cache.length == 12 and cache.k[0].shape == (2, 2, 12, 32)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    model = GPT(small_config(dropout=0.5))
    idx = torch.randint(0, V_SMALL, (1, 8))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


# ---- the model uses the kernels API and nothing else for attention, LayerNorm and the loss -----


def test_model_calls_only_the_kernels_api(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model must go through the kernels API")

    calls = {}

    def counted(name):
        fn = getattr(kernels.reference, name)  # the plain-math oracle: calls none of the F.* below

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("causal_attention", "layer_norm", "add_layer_norm", "linear_cross_entropy"):
        monkeypatch.setattr(kernels, name, counted(name))
    for name in ("scaled_dot_product_attention", "layer_norm", "cross_entropy"):
        monkeypatch.setattr(F, name, forbidden)
        monkeypatch.setattr(torch.nn.functional, name, forbidden)

    torch.manual_seed(0)
    model = GPT(small_config(bias=False))
    idx = torch.randint(0, V_SMALL, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    L = model.config.n_layer
    # per block: ln_1, then the residual add fused with ln_2; then ln_f
    assert calls == {"causal_attention": L, "layer_norm": L + 1, "add_layer_norm": L, "linear_cross_entropy": 1}
    # and no forbidden name appears in the source (a call in an untested branch would not trip the patch)
    source = inspect.getsource(llm.model)
    for name in ("scaled_dot_product_attention", "F.layer_norm", "F.cross_entropy", "nn.LayerNorm("):
        assert name not in source
    assert all(type(m) is not torch.nn.LayerNorm for m in model.modules())
    assert isinstance(model.transformer.ln_f, LayerNorm)


def test_autocast_runs_the_lm_head_and_loss_in_the_autocast_dtype(monkeypatch):
    # Under autocast ln_f's output is fp32 (the residual stream is); the fused head + loss must
    # still get the autocast dtype, as the lm_head Linear would, for both hidden states and weight.
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    _, fp32_loss = model(idx, idx)
    seen = []
    real = kernels.linear_cross_entropy

    def recording(hidden, weight, targets, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(kernels, "linear_cross_entropy", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_loss = model(idx, idx)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert torch.isfinite(bf16_loss)
    assert bf16_loss.float().item() == pytest.approx(fp32_loss.item(), abs=0.05)
    _, plain = model(idx, idx)  # no autocast: fp32 as before
    assert seen[-1] == (torch.float32, torch.float32) and plain.item() == fp32_loss.item()


def test_from_pretrained_crop_does_not_keep_the_full_position_table(tmp_path):
    pytest.importorskip("safetensors")
    GPT(GPTConfig.from_preset("tiny")).save_pretrained(tmp_path)
    short = GPT.from_pretrained(tmp_path, block_size=8)
    wpe = short.transformer.wpe.weight
    assert wpe.shape[0] == 8 and wpe.untyped_storage().nbytes() == wpe.numel() * wpe.element_size()
