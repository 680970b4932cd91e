"""The GPT's configuration: one dataclass for GPT-2, Llama 3 and Qwen3, and the named presets.

``GPTConfig.from_preset("llama-tiny", dropout=0.1)`` is a preset plus validated overrides;
``to_dict`` / ``from_dict`` are what a checkpoint stores and reads back.  What each field does to
the model is in ``llm/model.py``; the defaults are GPT-2's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GPTConfig", "PRESETS", "LLAMA3_ROPE_SCALING"]

# Llama 3.1+'s RoPE frequency scaling, as its config.json spells it (see llm/rope.py).
LLAMA3_ROPE_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
_LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False)  # what every non-GPT-2 preset shares

# Architecture presets.  The four GPT-2 sizes are OpenAI's (vocab 50257 is kept unpadded so that
# checkpoints load without surgery); "tiny" is for unit tests and "cpu-small" is the default model
# that learns tinyshakespeare visibly in a few minutes on 2 CPU cores.  llama3.2-1b and qwen3-0.6b
# are Meta's and Alibaba's shapes (parameter counts as published, tied); llama-tiny and qwen3-tiny
# are cpu-small-sized models of the same architectures with GPT-2's vocab, so that they train on
# tinyshakespeare with the GPT-2 tokenizer.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124.4M parameters (tied)
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 354.8M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774.0M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1557.6M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # 3.3M, 3.2M of them wte
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # 7.2M, 6.4M of them wte
    "llama3.2-1b": dict(  # 1,235.8M
        **_LLAMA, vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, head_dim=64,
        intermediate_size=8192, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING, norm_eps=1e-5,
        block_size=131072,
    ),
    "qwen3-0.6b": dict(  # 596.0M
        **_LLAMA, vocab_size=151936, n_layer=28, n_embd=1024, n_head=16, n_kv_head=8, head_dim=128,
        intermediate_size=3072, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, block_size=40960,
    ),
    # SwiGLU's three matrices of I ~ 8/3 C hold what GELU's two of 4C do (344: a multiple of 8; qwen3-tiny
    # takes Qwen3-0.6B's I = 3C).  rope_theta stays 10000: 128 positions need no slower frequencies.
    "llama-tiny": dict(**_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=344,
                       block_size=128),  # 7.2M, 6.4M of them wte
    "qwen3-tiny": dict(**_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, head_dim=64, intermediate_size=384,
                       qk_norm=True, norm_eps=1e-6, block_size=128),  # 7.4M, 6.4M of them wte
}

NORMS = ("layernorm", "rmsnorm")
POS_EMBS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
_ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence: the length of wpe's table, or (RoPE) only a limit
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding + residual dropout; none on attention probabilities (see attention)
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2 (Llama, Qwen3: none)
    tie_weights: bool = True  # lm_head.weight is transformer.wte.weight
    # -- what Llama 3 and Qwen3 choose differently; the defaults are GPT-2's
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (then no norm has a bias, whatever `bias` says)
    norm_eps: float = 1e-5
    pos_emb: str = "learned"  # "learned" (GPT-2's wpe table) or "rope" (rotary, applied to q and k)
    rope_theta: float = 10000.0  # RoPE's base: pair i of a head turns by pos * rope_theta**(-2i / head_dim)
    rope_scaling: dict | None = None  # Llama 3.1+: {"rope_type": "llama3", "factor": 32.0, ...} (llm/rope.py)
    mlp: str = "gelu"  # "gelu" (tanh approximation, as GPT-2) or "swiglu"
    intermediate_size: int | None = None  # the MLP's hidden width I; None: 4 * n_embd
    n_kv_head: int | None = None  # key/value heads; None: n_head; fewer: grouped-query attention
    head_dim: int | None = None  # None: n_embd // n_head
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of every head's q and k, before RoPE

    def __post_init__(self):
        """Validate every field (the message names it) and fill in the derived ones, so that
        ``to_dict()`` -- what a checkpoint stores -- spells out every size the model has.  (Hence
        ``dataclasses.replace(cfg, n_head=...)`` keeps the old head_dim and n_kv_head; to change a
        size, build from ``from_preset`` / ``from_dict`` instead.)"""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("intermediate_size", "n_kv_head", "head_dim"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"GPTConfig.{name} must be a positive int or None, got {value!r}")
        if self.head_dim is None:
            if self.n_embd % self.n_head != 0:
                raise ValueError(
                    f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                    "so that every head gets n_embd // n_head dims (or set head_dim)"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): "
                "each key/value head serves n_head // n_kv_head query heads"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not (_is_real(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"GPTConfig.norm_eps must be a positive float, got {self.norm_eps!r}")
        if not (_is_real(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"GPTConfig.rope_theta must be a positive float, got {self.rope_theta!r}")
        for name in ("bias", "tie_weights", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name, allowed in (("norm", NORMS), ("pos_emb", POS_EMBS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig.head_dim ({self.head_dim}) must be even with pos_emb='rope': "
                             "RoPE turns the head's dims in pairs")
        if self.rope_scaling is not None:
            self.rope_scaling = self._checked_rope_scaling(self.rope_scaling)

    def _checked_rope_scaling(self, s) -> dict:
        want = "{" + ", ".join(f"'{k}'" for k in _ROPE_SCALING_KEYS) + "}"
        if self.pos_emb != "rope":
            raise ValueError(f"GPTConfig.rope_scaling needs pos_emb='rope', got pos_emb={self.pos_emb!r}")
        if not isinstance(s, dict) or set(s) != set(_ROPE_SCALING_KEYS) or s["rope_type"] != "llama3":
            raise ValueError(f"GPTConfig.rope_scaling must be None or Llama 3's dict {want} with "
                             f"rope_type 'llama3', got {s!r}")
        for key in _ROPE_SCALING_KEYS[1:]:
            if not (_is_real(s[key]) and s[key] > 0):
                raise ValueError(f"GPTConfig.rope_scaling[{key!r}] must be a positive number, got {s[key]!r}")
        if not s["high_freq_factor"] > s["low_freq_factor"]:
            raise ValueError(f"GPTConfig.rope_scaling needs high_freq_factor > low_freq_factor, got {s!r}")
        return dict(s)  # a copy: the config never shares a dict with PRESETS or its caller

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """``GPTConfig.from_preset("cpu-small", dropout=0.1)``: a named preset plus validated overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a plain dict (e.g. one saved in a checkpoint); unknown keys are an error, not ignored."""
        if "layer_norm_eps" in d and "norm_eps" not in d:  # a checkpoint saved before the rename
            d = {("norm_eps" if k == "layer_norm_eps" else k): v for k, v in d.items()}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(fields))}"
            )
        return cls(**d)
