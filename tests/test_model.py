"""The GPT model: configs, parameter counts, initialisation, forward/loss semantics, kernel API use,
and the Llama 3 / Qwen3 variants (RMSNorm, RoPE, SwiGLU, grouped-query attention, q/k norms) against
a plain re-implementation."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
import llm.model
import llm.rope
from llm.config import LLAMA3_ROPE_SCALING
from llm.model import GPT, PRESETS, GPTConfig, KVCache, LayerNorm, RMSNorm
from llm.rope import RotaryEmbedding, rope_inv_freq


V_SMALL = 97  # a prime vocab keeps the tiny test models fast and catches V/C mix-ups


def small_config(**kw) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **{"vocab_size": V_SMALL, **kw})


def expected_num_params(cfg: GPTConfig) -> int:
    """The parameter count from the shapes: embeddings + n_layer blocks + ln_f (+ untied head)."""
    V, T, L, C, I = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.intermediate_size
    if cfg.norm == "layernorm" and cfg.head_dim * cfg.n_head == C and cfg.n_kv_head == cfg.n_head and I == 4 * C:
        # GPT-2, per block: ln_1 2C, c_attn 3C^2 + 3C, attn c_proj C^2 + C, ln_2 2C, c_fc 4C^2 + 4C, mlp c_proj 4C^2 + C
        per_block = 12 * C * C + 13 * C if cfg.bias else 12 * C * C + 2 * C
        n = V * C + T * C + L * per_block + (2 * C if cfg.bias else C)
        return n if cfg.tie_weights else n + V * C
    b = int(cfg.bias)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    norm = 2 * C if cfg.norm == "layernorm" and cfg.bias else C  # RMSNorm: a weight only
    fc = 2 * I if cfg.mlp == "swiglu" else I  # SwiGLU: gate and up
    per_block = (2 * norm + (C + b) * (q + 2 * kv) + (q + b) * C + (C + b) * fc + (I + b) * C
                 + (2 * cfg.head_dim if cfg.qk_norm else 0))
    n = V * C + (T * C if cfg.pos_emb == "learned" else 0) + L * per_block + norm
    return n if cfg.tie_weights else n + V * C


def llama_config(**kw) -> GPTConfig:
    """A tiny Llama 3: RMSNorm, RoPE with Llama 3's scaling (all three bands of frequencies used at
    head_dim 16), SwiGLU, 4 query heads sharing 2 k/v heads."""
    scaling = dict(LLAMA3_ROPE_SCALING, original_max_position_embeddings=64)
    base = dict(vocab_size=V_SMALL, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                intermediate_size=96, norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, rope_scaling=scaling)
    return GPTConfig(**{**base, **kw})


def qwen3_config(**kw) -> GPTConfig:
    """A tiny Qwen3: as llama_config plus per-head q/k RMSNorm, head_dim 24 != n_embd / n_head, no scaling."""
    return llama_config(**{"head_dim": 24, "qk_norm": True, "rope_scaling": None, "norm_eps": 1e-6,
                           "rope_theta": 1e6, **kw})


# ---- config -----------------------------------------------------------------------------------


def test_presets_and_round_trip():
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "cpu-small"} <= set(PRESETS)
    shape = lambda name: tuple(PRESETS[name][k] for k in ("n_layer", "n_head", "n_embd"))  # noqa: E731
    assert shape("gpt2") == (12, 12, 768) and shape("gpt2-medium") == (24, 16, 1024)
    assert shape("gpt2-large") == (36, 20, 1280) and shape("gpt2-xl") == (48, 25, 1600)
    cfg = GPTConfig.from_preset("cpu-small", dropout=0.1)
    assert cfg.n_layer == 4 and cfg.dropout == 0.1
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    # the derived sizes are filled in, so a checkpoint's config spells them out
    assert (cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size) == (4, 32, 512)
    arch = (cfg.norm, cfg.pos_emb, cfg.mlp, cfg.qk_norm, cfg.rope_scaling)
    assert arch == ("layernorm", "learned", "gelu", False, None)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips(name):
    cfg = GPTConfig.from_preset(name)
    d = cfg.to_dict()
    assert GPTConfig.from_dict(d) == cfg and GPTConfig.from_dict(d).to_dict() == d


def test_llama_and_qwen3_presets():
    llama = GPTConfig.from_preset("llama3.2-1b")
    assert llama.rope_scaling == LLAMA3_ROPE_SCALING
    assert llama.rope_scaling is not PRESETS["llama3.2-1b"]["rope_scaling"]
    llama.rope_scaling["factor"] = 8.0  # the config owns its dict: PRESETS stay as they are
    assert PRESETS["llama3.2-1b"]["rope_scaling"]["factor"] == 32.0
    assert (llama.n_head, llama.n_kv_head, llama.head_dim, llama.rope_theta) == (32, 8, 64, 500000.0)
    qwen = GPTConfig.from_preset("qwen3-0.6b")
    assert qwen.head_dim * qwen.n_head == 2048 != qwen.n_embd and qwen.qk_norm and qwen.norm_eps == 1e-6
    for name in ("llama-tiny", "qwen3-tiny"):
        tiny = GPTConfig.from_preset(name)
        assert tiny.vocab_size == 50257 and tiny.n_kv_head < tiny.n_head and tiny.pos_emb == "rope"
    assert GPTConfig.from_preset("qwen3-tiny").head_dim == 64 != 128 // 4


def test_a_checkpoint_config_from_before_norm_eps_loads():
    old = {k: v for k, v in GPTConfig.from_preset("tiny").to_dict().items()
           if k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "tie_weights")}
    cfg = GPTConfig.from_dict({**old, "layer_norm_eps": 1e-4})
    assert cfg.norm_eps == 1e-4 and cfg == GPTConfig.from_preset("tiny", norm_eps=1e-4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=65, n_head=2), "n_embd"),
        (dict(n_head=0), "n_head"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(n_layer=1.5), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(bias="yes"), "bias"),
        (dict(n_kv_head=5), "n_kv_head"),  # 12 heads do not split into 5 groups
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(head_dim=0), "head_dim"),
        (dict(head_dim=63, pos_emb="rope"), "head_dim"),  # RoPE turns pairs of dims
        (dict(intermediate_size=-4), "intermediate_size"),
        (dict(norm="batchnorm"), "norm"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(mlp="relu"), "mlp"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(qk_norm=1), "qk_norm"),
        (dict(rope_scaling=dict(LLAMA3_ROPE_SCALING)), "rope_scaling"),  # needs pos_emb="rope"
        (dict(pos_emb="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (dict(pos_emb="rope", rope_scaling=dict(LLAMA3_ROPE_SCALING, factor=0)), "rope_scaling"),
        (dict(pos_emb="rope", rope_scaling=dict(LLAMA3_ROPE_SCALING, high_freq_factor=1.0)), "rope_scaling"),
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
    with torch.device("meta"):  # shapes only: gpt2-xl and llama3.2-1b cost nothing
        model = GPT(cfg)
    assert model.num_parameters() == expected_num_params(cfg)
    published = {"gpt2": 124_439_808, "llama3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920}
    if name in published:
        assert model.num_parameters() == published[name]
    if name == "gpt2":
        assert model.num_parameters(non_embedding=True) == 124_439_808 - 1024 * 768
    if cfg.pos_emb == "rope":  # no position table to leave out
        assert "wpe" not in model.transformer and model.num_parameters(non_embedding=True) == model.num_parameters()


@pytest.mark.parametrize("kw", [dict(tie_weights=False), dict(bias=False), dict(bias=False, tie_weights=False),
                                dict(norm="rmsnorm"), dict(pos_emb="rope", n_kv_head=4, mlp="swiglu"),
                                dict(head_dim=80, qk_norm=True, intermediate_size=2000, pos_emb="rope")])
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


@pytest.mark.parametrize("make", [small_config, llama_config, qwen3_config], ids=["gpt2", "llama", "qwen3"])
def test_kv_cache_matches_full_forward(make):
    torch.manual_seed(0)
    model = GPT(make()).eval()
    cfg = model.config
    idx = torch.randint(0, V_SMALL, (2, 12))
    full, _ = model(idx)
    cache = KVCache(cfg.n_layer)
    parts = [model(idx[:, :5], kv_cache=cache)[0]]
    for t in range(5, 12):  # one token at a time, positions offset by the cache length
        parts.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    # only the key/value heads are cached (GQA: n_kv_head of them)
    assert cache.length == 12 and cache.k[0].shape == cache.v[0].shape == (2, cfg.n_kv_head, 12, cfg.head_dim)
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


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_model_calls_only_the_kernels_api(monkeypatch, arch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model must go through the kernels API")

    calls = {}

    def counted(name):
        fn = getattr(kernels.reference, name)  # the plain-math oracle: calls none of the F.* below

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    ops = ("causal_attention", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "rope", "swiglu",
           "linear_cross_entropy")
    for name in ops:
        monkeypatch.setattr(kernels, name, counted(name))
    for name in ("scaled_dot_product_attention", "layer_norm", "rms_norm", "silu", "cross_entropy"):
        monkeypatch.setattr(F, name, forbidden)
        monkeypatch.setattr(torch.nn.functional, name, forbidden)

    torch.manual_seed(0)
    model = GPT(small_config(bias=False) if arch == "gpt2" else qwen3_config())
    idx = torch.randint(0, V_SMALL, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    L = model.config.n_layer
    if arch == "gpt2":
        # per block: ln_1, then the residual add fused with ln_2; then ln_f
        assert calls == {"causal_attention": L, "layer_norm": L + 1, "add_layer_norm": L, "linear_cross_entropy": 1}
        assert isinstance(model.transformer.ln_f, LayerNorm)
    else:
        # per block: ln_1, q_norm, k_norm; RoPE on q and on k; ln_2 fused with the add; SwiGLU; then ln_f
        assert calls == {"causal_attention": L, "rms_norm": 3 * L + 1, "add_rms_norm": L, "rope": 2 * L,
                         "swiglu": L, "linear_cross_entropy": 1}
        assert isinstance(model.transformer.ln_f, RMSNorm)
    # and no forbidden name appears in the source (a call in an untested branch would not trip the patch)
    for module in (llm.model, llm.rope):
        source = inspect.getsource(module)
        for name in ("scaled_dot_product_attention", "F.layer_norm", "F.rms_norm", "F.silu", "sigmoid",
                     "F.cross_entropy", "nn.LayerNorm(", "nn.RMSNorm("):
            assert name not in source, (module.__name__, name)
    assert all(type(m) not in (torch.nn.LayerNorm, torch.nn.RMSNorm) for m in model.modules())


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


# ---- Llama 3 and Qwen3: the model against a plain re-implementation ------------------------------


def test_module_names_of_llama_and_qwen3():
    model = GPT(qwen3_config())
    cfg = model.config
    params = dict(model.named_parameters())
    assert "transformer.wpe.weight" not in params and "transformer.wpe" not in dict(model.named_modules())
    attn, mlp = model.transformer.h[1].attn, model.transformer.h[1].mlp
    # one Linear makes [q heads | k heads | v heads]; SwiGLU's c_fc makes [gate | up]
    assert attn.c_attn.weight.shape == ((cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, cfg.n_embd) == (192, 64)
    assert attn.c_proj.weight.shape == (cfg.n_embd, cfg.n_head * cfg.head_dim)
    assert mlp.c_fc.weight.shape == (2 * cfg.intermediate_size, cfg.n_embd) and mlp.c_proj.weight.shape == (64, 96)
    assert isinstance(attn.q_norm, RMSNorm) and attn.q_norm.weight.shape == (cfg.head_dim,)
    for name in ("ln_1", "ln_2"):
        assert isinstance(getattr(model.transformer.h[0], name), RMSNorm)
    assert not any(n.endswith("bias") for n in params)  # none anywhere, norms included
    assert set(model.state_dict()) == set(params) | {"lm_head.weight"}  # RoPE's buffer is not persistent
    assert not any("norm" in n for n, _ in GPT(llama_config()).named_parameters())  # q/k norms are Qwen3's


def plain_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The logits of a Llama / Qwen3 config recomputed from the model's state dict in fp64 with plain
    torch ops, written the way the book would: nothing from llm.model, llm.rope or kernels."""
    cfg = model.config
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def rms_norm(x, weight):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + cfg.norm_eps) * weight

    # RoPE's frequencies, Llama 3's scaling written out per frequency
    freqs = []
    for i in range(hd // 2):
        f = cfg.rope_theta ** (-2 * i / hd)
        if cfg.rope_scaling:
            s = cfg.rope_scaling
            old, lo, hi, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                                   s["high_freq_factor"], s["factor"])
            wavelength = 2 * math.pi / f
            if wavelength > old / lo:
                f = f / factor
            elif wavelength >= old / hi:
                smooth = (old / wavelength - lo) / (hi - lo)
                f = (1 - smooth) * f / factor + smooth * f
        freqs.append(f)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(freqs, dtype=torch.float64)  # (T, hd/2)
    cos, sin = torch.cat([angle.cos()] * 2, dim=-1), torch.cat([angle.sin()] * 2, dim=-1)  # (T, hd)

    def rope(x):  # (B, H, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = w["transformer.wte.weight"][idx]  # (B, T, C)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        qkv = rms_norm(x, w[p + "ln_1.weight"]) @ w[p + "attn.c_attn.weight"].T
        q = qkv[..., : nh * hd].reshape(B, T, nh, hd)
        k = qkv[..., nh * hd : (nh + nkv) * hd].reshape(B, T, nkv, hd)
        v = qkv[..., (nh + nkv) * hd :].reshape(B, T, nkv, hd)
        if cfg.qk_norm:
            q, k = rms_norm(q, w[p + "attn.q_norm.weight"]), rms_norm(k, w[p + "attn.k_norm.weight"])
        q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # head h reads h // group
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(mask, float("-inf"))
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + y @ w[p + "attn.c_proj.weight"].T
        gate, up = (rms_norm(x, w[p + "ln_2.weight"]) @ w[p + "mlp.c_fc.weight"].T).chunk(2, dim=-1)
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.c_proj.weight"].T
    return rms_norm(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T  # (B, T, V)


def randomized(model: GPT, seed: int = 0) -> GPT:
    """Norm weights away from 1 and bigger matrices, so that a misplaced weight or head shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(5)
    return model


@pytest.mark.parametrize("backend, dtype, tol", [("torch", torch.float64, 1e-6), ("pytorch", torch.float32, 2e-4)])
@pytest.mark.parametrize("make", [llama_config, qwen3_config], ids=["llama", "qwen3"])
def test_forward_equals_a_plain_reimplementation(make, backend, dtype, tol):
    torch.manual_seed(0)
    model = randomized(GPT(make())).to(dtype).eval()
    assert model.rotary.inv_freq.dtype == torch.float32  # .to(float64) casts no frequency
    idx = torch.randint(0, V_SMALL, (2, 19))
    with kernels.backend(backend):
        logits, _ = model(idx)
    expected = plain_logits(model, idx)
    assert expected.abs().max() > 1  # not a near-zero comparison
    torch.testing.assert_close(logits.double(), expected, atol=tol, rtol=tol)


def test_rms_norm_module():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    x, r = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    plain = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight  # noqa: E731
    torch.testing.assert_close(norm(x), plain(x))
    normed, total = norm.add_forward(x, r)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, plain(x + r))
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_llama3_frequency_scaling():
    """Short wavelengths kept, long ones slowed by `factor`, the band between blended (monotone)."""
    s = LLAMA3_ROPE_SCALING
    plain, scaled = rope_inv_freq(64, 500000.0), rope_inv_freq(64, 500000.0, s)
    assert plain.dtype == scaled.dtype == torch.float32 and plain.shape == (32,)
    exact = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(plain, exact, check_dtype=False)
    wavelength = 2 * math.pi / plain
    short = wavelength < s["original_max_position_embeddings"] / s["high_freq_factor"]
    long = wavelength > s["original_max_position_embeddings"] / s["low_freq_factor"]
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / s["factor"])
    ratio = (plain / scaled)[~short & ~long]  # between 1 and factor, growing with the wavelength
    assert (ratio > 1).all() and (ratio < s["factor"]).all() and (ratio.diff() > 0).all()


def test_rope_angles_are_hugging_faces_bit_for_bit():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                         max_position_embeddings=131072, rope_theta=500000.0,
                                         rope_scaling=dict(LLAMA3_ROPE_SCALING))
    theirs = LlamaRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(64, 500000.0, LLAMA3_ROPE_SCALING)
    assert torch.equal(ours.inv_freq, theirs.inv_freq)
    cos, sin = theirs(torch.zeros(1), torch.arange(130000, 130100)[None])  # (1, T, 64): both halves alike
    our_cos, our_sin = ours(130000, 100)  # (T, 32)
    assert torch.equal(our_cos, cos[0, :, :32]) and torch.equal(our_sin, sin[0, :, 32:])


def test_rope_turns_by_the_cache_position(monkeypatch):
    """Decoding asks for the angles of positions past .. past + T - 1, past the cache length."""
    model = GPT(llama_config()).eval()
    asked = []
    real = RotaryEmbedding.forward
    def recording(self, past, T):
        asked.append((past, T))
        return real(self, past, T)

    monkeypatch.setattr(RotaryEmbedding, "forward", recording)
    cache = KVCache(model.config.n_layer)
    idx = torch.randint(0, V_SMALL, (1, 9))
    model(idx[:, :6], kv_cache=cache)
    model(idx[:, 6:7], kv_cache=cache)
    model(idx[:, 7:], kv_cache=cache)
    model(idx)
    assert asked == [(0, 6), (6, 1), (7, 2), (0, 9)]
    cos, sin = model.rotary(6, 1)
    torch.testing.assert_close(cos[0], torch.cos(6 * model.rotary.inv_freq))
    torch.testing.assert_close(sin[0], torch.sin(6 * model.rotary.inv_freq))


def test_rope_makes_attention_depend_on_distance_only():
    """Shifting every position by the same offset changes no score: q_m . k_n depends on m - n."""
    torch.manual_seed(0)
    rotary = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(1, 1, 5, 16, dtype=torch.float64), torch.randn(1, 1, 5, 16, dtype=torch.float64)
    scores = [kernels.rope(q, *rotary(p, 5)) @ kernels.rope(k, *rotary(p, 5)).transpose(-2, -1) for p in (0, 37)]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)  # fp32 angles of larger positions


def test_dtype_casts_and_meta_device_keep_exact_frequencies():
    model = GPT(llama_config())
    exact = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, exact)
    with torch.device("meta"):
        meta = GPT(llama_config())
    assert meta.rotary.inv_freq.is_meta
    meta.to_empty(device="cpu")  # as a loader that fills the weights later would
    assert torch.equal(meta.rotary.inv_freq, exact)


@pytest.mark.parametrize("make", [llama_config, qwen3_config], ids=["llama", "qwen3"])
def test_activation_checkpointing_with_rope(make):
    torch.manual_seed(0)
    model = GPT(make(dropout=0.1)).train()
    idx = torch.randint(0, V_SMALL, (2, 16))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        _, loss = model(idx, idx.roll(1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ck, grads_ck) = results
    assert torch.equal(loss, loss_ck)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_untie_weights_and_lora_on_qwen3():
    from llm.finetune.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = GPT(qwen3_config()).eval()
    idx = torch.randint(0, V_SMALL, (1, 8))
    before = model(idx)[0]
    model.untie_weights()
    torch.testing.assert_close(model(idx)[0], before)
    trainable = apply_lora(model, rank=2, alpha=4)  # the default targets: c_attn, c_proj, c_fc
    L, C, cfg = model.config.n_layer, model.config.n_embd, model.config
    qkv, q, two_i, inter = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, cfg.n_head * cfg.head_dim, 192, 96
    assert trainable == L * 2 * ((C + qkv) + (q + C) + (C + two_i) + (inter + C))
    torch.testing.assert_close(model(idx)[0], before)  # B starts at zero
    merge_lora(model)
    torch.testing.assert_close(model(idx)[0], before)
