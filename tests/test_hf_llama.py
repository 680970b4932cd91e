"""Hugging Face Llama and Qwen3 interop, both directions, against small random transformers models.

Nothing is downloaded: every reference model is built locally from a ``LlamaConfig`` /
``Qwen3Config`` in fp32, with every weight (norm gains included) randomised so that a swapped
q/k/v block, a gate/up mix-up or a norm in the wrong place shows in the logits.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from llm.generate import generate  # noqa: E402
from llm.model import GPT, GPTConfig, KVCache  # noqa: E402

V = 211
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              # 16: short enough that the scaling changes the frequencies the 17-token test batch sees
              original_max_position_embeddings=16)
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
CASES = {
    "llama": dict(family="llama", head_dim=16),
    "llama-tied": dict(family="llama", head_dim=16, tie_word_embeddings=True),
    "llama3-rope": dict(family="llama", head_dim=16, rope_parameters=dict(rope_theta=500000.0, **LLAMA3)),
    "llama-bias": dict(family="llama", head_dim=16, attention_bias=True, mlp_bias=True),
    "qwen3": dict(family="qwen3", head_dim=24, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen3-tied": dict(family="qwen3", head_dim=24, tie_word_embeddings=True),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
IDX = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))


def hf_model(case: str, seed: int = 0):
    kw = dict(CASES[case])
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[kw.pop("family")])
    cfg = config_cls(**{**COMMON, **kw})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomize(model)
    return model


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norm gains (HF: *layernorm, q_norm, k_norm, model.norm; ours: ln_*, q_norm, k_norm) near 1
            centre = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(centre + 0.1 * torch.randn_like(p))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_ours(tmp_path, case):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    c, h = ours.config, ref.config
    assert (c.norm, c.pos_emb, c.mlp, c.qk_norm) == ("rmsnorm", "rope", "swiglu", h.model_type == "qwen3")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (2, 64, 4, 2, h.head_dim)
    assert (c.intermediate_size, c.block_size, c.norm_eps, c.vocab_size) == (96, 64, 1e-6, V)
    assert c.rope_theta == h.rope_parameters["rope_theta"] and c.bias == h.attention_bias
    assert c.rope_scaling == ({"rope_type": "llama3", **LLAMA3} if case == "llama3-rope" else None)
    assert c.tie_weights == h.tie_word_embeddings
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == h.tie_word_embeddings
    assert "wpe" not in ours.transformer and all(p.dtype == torch.float32 for p in ours.parameters())
    assert_same(our_logits(ours, IDX), hf_logits(ref, IDX))


def test_llama3_rope_scaling_matters(tmp_path):
    """The llama3 case would pass with the scaling ignored if it did not change these logits."""
    ref = hf_model("llama3-rope")
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    plain = GPT(GPTConfig.from_dict({**ours.config.to_dict(), "rope_scaling": None}))
    plain.load_state_dict(ours.state_dict())
    assert (our_logits(plain, IDX) - hf_logits(ref, IDX)).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["llama3-rope", "qwen3"])
def test_kv_cache_decoding_matches_transformers(tmp_path, case):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    full = hf_logits(ref, IDX)  # (B, 17, V)
    cache = KVCache(ours.config.n_layer)
    with torch.no_grad():
        logits, _ = ours(IDX[:, :14], kv_cache=cache)  # prefill
        assert_same(logits, full[:, :14])
        for t in range(14, 17):  # then one token at a time from the cache
            logits, _ = ours(IDX[:, t : t + 1], kv_cache=cache)
            assert_same(logits[:, 0], full[:, t])
    assert cache.k[0].shape == (2, 2, 17, ref.config.head_dim)  # only the n_kv_head = 2 key heads are cached
    # greedy decoding, ours (llm.generate) against transformers' generate with its own cache
    prompt = IDX[:, :5]
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 8, temperature=0), theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_hf_and_back(tmp_path, case):
    ours = GPT.from_pretrained(_save(hf_model(case), tmp_path / "src"))
    torch.manual_seed(1)
    randomize(ours)  # weights of our own, so that nothing can pass by echoing the source files
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    family = CASES[case]["family"]
    assert cfg["model_type"] == family and cfg["architectures"] == [CLASSES[family][1]]
    assert cfg["tie_word_embeddings"] == ours.config.tie_weights and cfg["dtype"] == "float32"
    keys = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors").keys()
    assert ("lm_head.weight" in keys) == (not ours.config.tie_weights)  # a tied head is not written twice

    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(ref).__name__ == CLASSES[family][1]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()) == ours.config.tie_weights
    assert_same(hf_logits(ref.eval(), IDX), our_logits(ours, IDX))
    # and back again: the same config, field for field, and bitwise the same logits
    again = GPT.from_pretrained(tmp_path / "out")
    assert again.config == ours.config
    torch.testing.assert_close(our_logits(again, IDX), our_logits(ours, IDX), atol=0, rtol=0)


def test_preset_saves_and_loads_in_transformers(tmp_path):
    """A GPT built from scratch (the qwen3-tiny preset's shapes, smaller vocab) is a Qwen3 to transformers."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset("qwen3-tiny", vocab_size=V, n_layer=2)).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.head_dim == 64 and ref.config.num_key_value_heads == 2
    assert_same(hf_logits(ref, IDX), our_logits(ours, IDX))


def test_sharded_checkpoint(tmp_path):
    ref = hf_model("qwen3")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert_same(our_logits(GPT.from_pretrained(tmp_path), IDX), hf_logits(ref, IDX))


def test_legacy_config_keys(tmp_path):
    """config.json as Llama 3.x uploads spell it: rope_theta + rope_scaling, torch_dtype, no rope_parameters."""
    ref = hf_model("llama3-rope")
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=cfg.pop("dtype"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 500000.0 and ours.config.rope_scaling["factor"] == 8.0
    assert_same(our_logits(ours, IDX), hf_logits(ref, IDX))


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    ref = hf_model("llama").to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert torch.equal(ours.transformer.wte.weight, ref.model.embed_tokens.weight.float())
    ours.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_overrides(tmp_path):
    _save(hf_model("llama-tied"), tmp_path)
    short = GPT.from_pretrained(tmp_path, block_size=20, dropout=0.1, tie_weights=False)
    assert short.config.block_size == 20 and short.config.dropout == 0.1
    assert short.lm_head.weight.data_ptr() != short.transformer.wte.weight.data_ptr()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        GPT.from_pretrained(tmp_path, block_size=65)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT.from_pretrained(tmp_path, n_kv_head=4)


@pytest.mark.parametrize("case, key, value", [
    ("llama", "hidden_act", "gelu"),
    ("llama", "rope_parameters", dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
    ("llama", "rope_parameters", dict(rope_type="linear", rope_theta=1e4, factor=2.0)),
    ("llama", "rope_parameters", dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
    ("llama", "mlp_bias", True),  # with attention_bias False: one bias flag cannot say that
    ("qwen3", "attention_bias", True),  # Qwen3's MLP never has biases
    ("qwen3", "use_sliding_window", True),
    ("qwen3", "layer_types", ["full_attention", "sliding_attention"]),
    ("llama", "quantization_config", {"quant_method": "bitsandbytes"}),
    ("llama", "model_type", "mistral"),
])
def test_unsupported_configs_are_refused(tmp_path, case, key, value):
    _save(hf_model(case), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    words = {"rope_parameters": r"rope_type|partial_rotary_factor", "mlp_bias": "attention_bias"}
    with pytest.raises(ValueError, match=words.get(key, key)):
        GPT.from_pretrained(tmp_path)


def test_config_missing_a_required_key(tmp_path):
    _save(hf_model("llama"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks 'intermediate_size'"):
        GPT.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path):
    _save(hf_model("qwen3"), tmp_path)
    path = tmp_path / "model.safetensors"
    sd = safetensors_torch.load_file(path)
    safetensors_torch.save_file({k: v for k, v in sd.items() if "layers.1.self_attn.k_norm" not in k}, path)
    with pytest.raises(RuntimeError, match=r"lacks model\.layers\.1\.self_attn\.k_norm\.weight"):
        GPT.from_pretrained(tmp_path)
    safetensors_torch.save_file({**sd, "model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}, path)
    with pytest.raises(RuntimeError, match=r"no place for: model\.layers\.2\.mlp\.up_proj\.weight"):
        GPT.from_pretrained(tmp_path)
    safetensors_torch.save_file({**sd, "model.norm.weight": torch.ones(63)}, path)
    with pytest.raises(RuntimeError, match="ln_f.weight"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("overrides, match", [
    (dict(norm="rmsnorm"), r"norm='rmsnorm', pos_emb='learned', mlp='gelu'"),
    (dict(pos_emb="rope", mlp="swiglu"), r"norm='layernorm', pos_emb='rope'"),
    (dict(n_kv_head=2), "GPT-2: n_kv_head=2"),
    (dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", qk_norm=True, bias=True), "Qwen3's MLP has none"),
])
def test_save_refuses_what_transformers_cannot_load(tmp_path, overrides, match):
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=4, n_embd=64, **overrides))
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)  # refused before anything is written


def _save(model, path):
    model.save_pretrained(path)
    return path
