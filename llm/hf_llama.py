"""Hugging Face Llama and Qwen3 checkpoints <-> our GPT (rmsnorm + rope + swiglu); ``llm.hf`` calls in here.

    HF LlamaForCausalLM / Qwen3ForCausalLM                ours
    model.embed_tokens                                    transformer.wte
    model.layers.i.input_layernorm                        transformer.h.i.ln_1          (RMSNorm)
    model.layers.i.self_attn.{q,k,v}_proj  (cat, dim 0)   transformer.h.i.attn.c_attn   rows [q | k | v heads]
    model.layers.i.self_attn.{q,k}_norm    (Qwen3)        transformer.h.i.attn.{q,k}_norm
    model.layers.i.self_attn.o_proj                       transformer.h.i.attn.c_proj
    model.layers.i.post_attention_layernorm               transformer.h.i.ln_2
    model.layers.i.mlp.{gate,up}_proj      (cat, dim 0)   transformer.h.i.mlp.c_fc      rows [gate (I) | up (I)]
    model.layers.i.mlp.down_proj                          transformer.h.i.mlp.c_proj
    model.norm                                            transformer.ln_f
    lm_head                                               lm_head (absent when tied)

Our RoPE rotates halves of each head, as HF's Llama does, so q_proj and k_proj map without the
interleave permutation that Meta's original checkpoints would need.  Everything is nn.Linear
(out, in) on both sides: concatenation and splitting are the only changes to the tensors.
"""
from __future__ import annotations

import re

import torch

from .model import GPTConfig

FAMILIES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_DEFAULT_THETA = 10_000.0  # transformers' default_theta when a config names none
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer that old checkpoints saved, not a weight


def config_kwargs_from_hf(hf: dict) -> dict:
    """GPTConfig keyword arguments for a Llama / Qwen3 config.json dict; refuses what the model cannot reproduce."""
    mt = hf["model_type"]
    name = f"{mt} checkpoint"

    def refuse(key, got, want):
        raise ValueError(f"unsupported {name}: config.json has {key}={got!r}, this model needs {want}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "'silu' (SwiGLU)")
    if hf.get("quantization_config"):
        refuse("quantization_config", hf["quantization_config"], "none (plain fp32/bf16/fp16 weights)")
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))  # Qwen3 has no such key: its MLP never has biases
    if attention_bias != mlp_bias:
        refuse("attention_bias", attention_bias, f"to equal mlp_bias={mlp_bias} (one bias flag for every Linear)")
    if mt == "qwen3" and hf.get("use_sliding_window", False):
        refuse("use_sliding_window", True, "False (sliding-window attention is not implemented)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "only 'full_attention'")

    C, n_head = hf["hidden_size"], hf["num_attention_heads"]
    # Qwen3Config's own default head_dim is 128, not hidden_size // heads: follow the class defaults.
    head_dim = hf.get("head_dim") or (128 if mt == "qwen3" else C // n_head)
    theta, scaling = _rope_from_hf(hf, refuse)
    return dict(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=C, n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=head_dim, intermediate_size=hf["intermediate_size"], norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), pos_emb="rope", rope_theta=theta, rope_scaling=scaling, mlp="swiglu",
        qk_norm=(mt == "qwen3"), bias=attention_bias, tie_weights=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
    )


def _rope_from_hf(hf: dict, refuse) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or the older rope_theta + rope_scaling."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        refuse("rope_parameters", sorted(params), "one RoPE for every layer, not one per layer type")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", _DEFAULT_THETA)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", params["partial_rotary_factor"], "1.0 (RoPE on the whole head)")
    params.pop("partial_rotary_factor", None)
    if kind == "default":
        if params:
            refuse("rope_scaling", params, "no scaling parameters with rope_type 'default'")
        return theta, None
    if kind != "llama3":
        refuse("rope_type", kind, "'default' or 'llama3'")
    # transformers fills in original_max_position_embeddings from max_position_embeddings when absent
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    extra = sorted(set(params) - set(_LLAMA3_KEYS))
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if extra or missing:
        refuse("rope_scaling", params, f"exactly the llama3 keys {', '.join(_LLAMA3_KEYS)}")
    scaling = {"rope_type": "llama3", **{k: params[k] for k in _LLAMA3_KEYS}}
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return theta, scaling


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, ckpt_tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from a LlamaForCausalLM / Qwen3ForCausalLM one; ``sd`` is consumed."""
    sd = {k if k.startswith(("model.", "lm_head.")) else "model." + k: v  # a bare LlamaModel has no "model."
          for k, v in sd.items() if not _HF_IGNORED.search(k)}

    def take(*keys):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise RuntimeError(f"the checkpoint lacks {', '.join(missing)} that its config.json implies")
        ts = [sd.pop(k).to(torch.float32) for k in keys]
        return ts[0].contiguous() if len(ts) == 1 else torch.cat(ts, dim=0)  # rows stacked in `keys` order

    out = {"transformer.wte.weight": take("model.embed_tokens.weight")}
    for i in range(config.n_layer):
        hf, us = f"model.layers.{i}.", f"transformer.h.{i}."
        out[us + "ln_1.weight"] = take(hf + "input_layernorm.weight")
        out[us + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight")
        kinds = ("weight", "bias") if config.bias else ("weight",)
        for w in kinds:
            out[us + f"attn.c_attn.{w}"] = take(*(hf + f"self_attn.{p}_proj.{w}" for p in "qkv"))  # [q | k | v]
            out[us + f"attn.c_proj.{w}"] = take(hf + f"self_attn.o_proj.{w}")
            out[us + f"mlp.c_fc.{w}"] = take(hf + f"mlp.gate_proj.{w}", hf + f"mlp.up_proj.{w}")  # [gate | up]
            out[us + f"mlp.c_proj.{w}"] = take(hf + f"mlp.down_proj.{w}")
        if config.qk_norm:
            out[us + "attn.q_norm.weight"] = take(hf + "self_attn.q_norm.weight")
            out[us + "attn.k_norm.weight"] = take(hf + "self_attn.k_norm.weight")
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    if ckpt_tied:
        sd.pop("lm_head.weight", None)  # some tied uploads store the copy anyway
        out["lm_head.weight"] = out["transformer.wte.weight"]
        if not config.tie_weights:
            out["lm_head.weight"] = out["lm_head.weight"].clone()
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    if sd:
        extra = sorted(sd)
        raise RuntimeError(f"the checkpoint has {len(extra)} weight(s) this model has no place for: "
                           f"{', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
    return out


def family_of(cfg: GPTConfig) -> str:
    """"llama" or "qwen3": the Hugging Face architecture a rmsnorm/rope/swiglu GPTConfig saves as."""
    family = "qwen3" if cfg.qk_norm else "llama"
    if family == "qwen3" and cfg.bias:
        raise ValueError("cannot save as Qwen3: bias=True gives the MLP biases, and Qwen3's MLP has none")
    return family


def hf_config(cfg: GPTConfig, tied: bool, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM / Qwen3ForCausalLM, readable by transformers 4 and 5."""
    family = family_of(cfg)
    C = cfg.n_embd
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    eos = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocab has it
    out = {
        "model_type": family,
        "architectures": [FAMILIES[family]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": C,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling (5 converts those too)
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "attention_bias": cfg.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),  # the key transformers 4 reads
    }
    if family == "llama":
        out.update(mlp_bias=cfg.bias, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                   layer_types=["full_attention"] * cfg.n_layer)
    return out


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig, tied: bool) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM / Qwen3ForCausalLM tensors from our state dict: splits c_attn and c_fc back apart."""
    I, hd = cfg.intermediate_size, cfg.head_dim  # noqa: E741
    qkv_rows = [cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd]

    def t(name):
        return sd[name].detach().cpu().contiguous()

    out = {"model.embed_tokens.weight": t("transformer.wte.weight"), "model.norm.weight": t("transformer.ln_f.weight")}
    if not tied:
        out["lm_head.weight"] = t("lm_head.weight")
    for i in range(cfg.n_layer):
        hf, us = f"model.layers.{i}.", f"transformer.h.{i}."
        out[hf + "input_layernorm.weight"] = t(us + "ln_1.weight")
        out[hf + "post_attention_layernorm.weight"] = t(us + "ln_2.weight")
        for w in ("weight", "bias") if cfg.bias else ("weight",):
            # clone: the pieces of a split share storage, which safetensors refuses to write
            q, k, v = (x.clone() for x in t(us + f"attn.c_attn.{w}").split(qkv_rows, dim=0))
            gate, up = (x.clone() for x in t(us + f"mlp.c_fc.{w}").split([I, I], dim=0))
            parts = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                     "self_attn.o_proj": t(us + f"attn.c_proj.{w}"), "mlp.gate_proj": gate, "mlp.up_proj": up,
                     "mlp.down_proj": t(us + f"mlp.c_proj.{w}")}
            out.update({f"{hf}{p}.{w}": x for p, x in parts.items()})
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = t(us + "attn.q_norm.weight")
            out[hf + "self_attn.k_norm.weight"] = t(us + "attn.k_norm.weight")
    return out
