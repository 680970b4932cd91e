"""Hugging Face checkpoints, both ways: ``GPT.from_pretrained`` and ``GPT.save_pretrained``.

Three architectures, chosen by config.json's ``model_type`` on load and by the GPTConfig on save:

* ``gpt2`` (layernorm, learned positions, GELU): HF's GPT-2 uses the same module names as ours
  (``transformer.h.0.attn.c_attn.weight`` ...), but its Conv1D layers store weights as (in, out)
  where nn.Linear stores (out, in): the four ``_CONV1D`` weights are transposed both ways, and
  everything else maps key to key.
* ``llama`` and ``qwen3`` (rmsnorm, RoPE, SwiGLU, grouped-query attention; Qwen3 adds q/k norms):
  the key mapping, which concatenates q/k/v and gate/up into our fused Linears, is in ``llm.hf_llama``.

Weights come from model.safetensors, a sharded model.safetensors.index.json, or (GPT-2 only in
practice) a weights-only pytorch_model.bin, and are loaded as fp32.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
import torch.nn as nn

from . import hf_llama
from .model import GPT, GPTConfig, LayerNorm

__all__ = ["load_pretrained", "save_pretrained"]

SUPPORTED_MODEL_TYPES = ("gpt2", *hf_llama.FAMILIES)


def load_pretrained(name_or_dir: str | os.PathLike, **overrides) -> GPT:
    """Load a Hugging Face GPT-2, Llama or Qwen3 checkpoint: a local directory, or a hub name when online.

    The directory holds config.json and model.safetensors (or a sharded index, or
    pytorch_model.bin).  ``overrides`` may set ``dropout`` (0.0 unless given, whatever the
    checkpoint says, as in nanoGPT), a smaller ``block_size`` (crops wpe; with RoPE, only the
    longest sequence) or ``tie_weights=False`` (copies wte into an independent lm_head).
    Returns an fp32 model in train mode.
    """
    ckpt_dir = _resolve_checkpoint_dir(name_or_dir)
    config_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {ckpt_dir!r} (looked for {config_path!r})")
    with open(config_path) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type", "gpt2")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported checkpoint: config.json has model_type={model_type!r}; "
                         f"this model loads {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}")
    try:
        if model_type == "gpt2":
            config = _config_from_hf(hf_config, overrides)
        else:
            config = _with_overrides(hf_llama.config_kwargs_from_hf(hf_config), overrides, "max_position_embeddings")
    except KeyError as exc:
        raise ValueError(f"{config_path} lacks {exc}, which a {model_type} config.json must have") from None
    if model_type == "gpt2":
        ckpt_tied = bool(hf_config.get("tie_word_embeddings", True))
        sd = _gpt2_state_dict(_read_hf_weights(ckpt_dir), config, ckpt_tied)
    else:
        ckpt_tied = bool(hf_config.get("tie_word_embeddings", False))
        try:
            sd = hf_llama.state_dict_from_hf(_read_hf_weights(ckpt_dir), config, ckpt_tied)
        except RuntimeError as exc:
            raise RuntimeError(f"the weights in {ckpt_dir!r} do not match its config.json: {exc}") from None

    # Build on the meta device (no memory, no random init) and adopt the loaded tensors.
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise RuntimeError(f"the weights in {ckpt_dir!r} do not match its config.json: {exc}") from None
    if config.tie_weights:  # assign=True made two Parameters out of the shared tensor; re-tie
        model.lm_head.weight = model.transformer.wte.weight
    _materialize_buffers(model)
    return model


def _gpt2_state_dict(hf_sd: dict[str, torch.Tensor], config: GPTConfig, ckpt_tied: bool) -> dict[str, torch.Tensor]:
    sd = {}
    for key, t in hf_sd.items():
        if _HF_IGNORED.search(key):  # old causal-mask buffers, not weights
            continue
        # GPT2Model checkpoints (the original "gpt2" upload) have no "transformer." prefix.
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith(_CONV1D):
            t = t.t()  # (in, out) -> (out, in)
        sd[name] = t.to(torch.float32).contiguous()
    wte = sd.get("transformer.wte.weight")
    if ckpt_tied and wte is not None:
        sd["lm_head.weight"] = wte if config.tie_weights else wte.clone()
    if "transformer.wpe.weight" in sd:
        # clone(): a slice is a view that would keep the whole (n_positions, C) storage alive
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][: config.block_size].clone()
    return sd


def _materialize_buffers(model: GPT) -> None:
    """Built on the meta device, RoPE's frequency buffer (in no state dict) is still meta: make it on the CPU.
    ``to_empty`` allocates it and RotaryEmbedding's ``_apply`` refills it with the exact fp32 values."""
    if model.rotary is not None:
        model.rotary.to_empty(device="cpu")
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"buffers left on the meta device after loading: {', '.join(meta)}")


def save_pretrained(model: GPT, save_dir: str | os.PathLike) -> None:
    """Write config.json + model.safetensors that transformers loads as the GPT's architecture.

    ``GPT2LMHeadModel`` for a layernorm / learned-position / GELU GPT, ``LlamaForCausalLM`` for
    rmsnorm / rope / swiglu, ``Qwen3ForCausalLM`` when that also has ``qk_norm``; any other mix is
    refused.  With tied weights lm_head.weight is not written: Hugging Face re-ties it from
    ``tie_word_embeddings`` (and its own save_pretrained omits it too).  A ``bias=False`` GPT-2
    is written with zero biases, because HF's GPT-2 always has them; the function is the same.
    """
    from safetensors.torch import save_file

    cfg = model.config
    family = hf_family(cfg)
    tied = model.lm_head.weight is model.transformer.wte.weight
    dtype = model.transformer.wte.weight.dtype
    if family == "gpt2":
        hf_config, tensors = _gpt2_hf_checkpoint(model, tied)
    else:
        hf_config = hf_llama.hf_config(cfg, tied, dtype)
        tensors = hf_llama.hf_state_dict(model.state_dict(), cfg, tied)
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(save_dir, "model.safetensors"), metadata={"format": "pt"})


def hf_family(cfg: GPTConfig) -> str:
    """The Hugging Face model_type a GPTConfig saves as: "gpt2", "llama" or "qwen3"; other mixes are refused."""
    arch = (cfg.norm, cfg.pos_emb, cfg.mlp)
    if arch == ("rmsnorm", "rope", "swiglu"):
        return hf_llama.family_of(cfg)
    if arch == ("layernorm", "learned", "gelu"):
        gpt2_only = dict(n_kv_head=(cfg.n_kv_head, cfg.n_head), head_dim=(cfg.head_dim, cfg.n_embd // cfg.n_head),
                         intermediate_size=(cfg.intermediate_size, 4 * cfg.n_embd), qk_norm=(cfg.qk_norm, False))
        for key, (got, want) in gpt2_only.items():
            if got != want:
                raise ValueError(f"cannot save as GPT-2: {key}={got!r}, and Hugging Face's GPT-2 needs {want!r}")
        return "gpt2"
    raise ValueError(f"cannot save as a Hugging Face model: norm={arch[0]!r}, pos_emb={arch[1]!r}, mlp={arch[2]!r}; "
                     "transformers has GPT-2 for ('layernorm', 'learned', 'gelu') and Llama / Qwen3 for "
                     "('rmsnorm', 'rope', 'swiglu')")


def _gpt2_hf_checkpoint(model: GPT, tied: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, tensors) for transformers' GPT2LMHeadModel."""
    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith(_CONV1D):
            t = t.t()  # (out, in) -> Conv1D's (in, out)
        tensors[name] = t.detach().cpu().contiguous()
    for name, module in model.named_modules():
        if name.startswith("transformer.") and f"{name}.bias" not in tensors:
            if isinstance(module, nn.Linear):
                tensors[f"{name}.bias"] = torch.zeros(module.out_features, dtype=module.weight.dtype)
            elif isinstance(module, LayerNorm):
                tensors[f"{name}.bias"] = torch.zeros_like(module.weight, device="cpu")

    eos = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocab has it
    hf_config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,  # this model has no dropout on attention probabilities
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": True,
        "dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
    }
    return hf_config, tensors


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_IGNORED = re.compile(r"\.attn\.(masked_)?bias$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "openai-community/gpt2-xl"


def _resolve_checkpoint_dir(name_or_dir: str | os.PathLike) -> str:
    """A local directory as is; otherwise a hub name, downloaded (lazily importing huggingface_hub)."""
    path = os.path.expanduser(os.fspath(name_or_dir))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not _HUB_ID.fullmatch(str(name_or_dir)):
        raise FileNotFoundError(
            f"no such checkpoint directory: {path!r} (expected a directory with config.json and model.safetensors)"
        )
    try:
        from huggingface_hub import snapshot_download

        # model.safetensors, or model-00001-of-00004.safetensors ... + model.safetensors.index.json
        weights = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
        local = snapshot_download(repo_id=str(name_or_dir), allow_patterns=["config.json", *weights])
        if not any(f.endswith(".safetensors") for f in os.listdir(local)):  # older repos: .bin only
            local = snapshot_download(repo_id=str(name_or_dir), allow_patterns=["config.json", "pytorch_model.bin"])
        return local
    except Exception as exc:  # offline, unknown repo, huggingface_hub not installed ...
        raise OSError(
            f"{str(name_or_dir)!r} is not a local directory, and downloading it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {exc}). If you are offline, pass a local directory that holds the "
            "checkpoint's config.json and model.safetensors."
        ) from exc


def _read_hf_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    single = os.path.join(ckpt_dir, "model.safetensors")
    index = single + ".index.json"
    legacy = os.path.join(ckpt_dir, "pytorch_model.bin")
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.torch import load_file

        if os.path.isfile(single):
            return load_file(single)
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: t for shard in shards for k, t in load_file(os.path.join(ckpt_dir, shard)).items()}
    if os.path.isfile(legacy):
        try:  # weights_only: a pickle that would run code is refused, not executed
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (UnpicklingError and friends: say what and why)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"refusing to load {legacy}: it is not a plain tensor file ({first[:200]}); a pickle "
                             "that would run code on load is never executed -- get the model's model.safetensors, "
                             "or convert the file where you trust it") from None
    raise FileNotFoundError(
        f"no weights in {ckpt_dir!r}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _config_from_hf(hf: dict, overrides: dict) -> GPTConfig:
    """Map a Hugging Face GPT2Config dict to ours, refusing variants this model cannot reproduce."""
    unsupported = {
        "model_type": (hf.get("model_type", "gpt2"), "gpt2"),
        "activation_function": (hf.get("activation_function", "gelu_new"), "gelu_new"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
        "n_inner": (hf.get("n_inner") or 4 * hf["n_embd"], 4 * hf["n_embd"]),
    }
    if unsupported["activation_function"][0] == "gelu_pytorch_tanh":  # the same function
        unsupported["activation_function"] = ("gelu_new", "gelu_new")
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"unsupported GPT-2 checkpoint: config.json has {key}={got!r}, this model needs {want!r}")
    base = dict(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_weights=bool(hf.get("tie_word_embeddings", True)), bias=True, dropout=0.0,
    )
    return _with_overrides(base, overrides, "n_positions")


def _with_overrides(base: dict, overrides: dict, positions_key: str) -> GPTConfig:
    """GPTConfig from a checkpoint's fields plus what a caller may change: dropout, a shorter block_size, untying."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    for key in overrides:
        if key not in fields:
            raise ValueError(f"unknown GPTConfig field {key!r} in from_pretrained overrides")
        if key not in ("dropout", "block_size", "tie_weights"):
            raise ValueError(f"cannot override {key!r} when loading pretrained weights: the checkpoint fixes it")
    n_positions = base["block_size"]
    if overrides.get("block_size", n_positions) > n_positions:
        raise ValueError(f"block_size={overrides['block_size']} exceeds the checkpoint's {positions_key}={n_positions}")
    if overrides.get("tie_weights") and not base["tie_weights"]:
        raise ValueError("tie_weights=True: the checkpoint has separate wte and lm_head weights, they cannot be tied")
    return GPTConfig.from_dict({**base, **overrides})
