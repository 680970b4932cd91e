"""GPT-2, readable in one sitting.

    token ids (B, T)
      -> wte(idx) + wpe(pos)                      token + position embeddings      (B, T, C)
      -> n_layer x Block:                         pre-LN transformer blocks
             x = x + attn(ln_1(x))                causal multi-head self-attention
             x = x + mlp(ln_2(x))                 Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C)
      -> ln_f                                     final LayerNorm                  (B, T, C)
      -> lm_head (tied to wte by default)         logits                           (B, T, V)

Attention, LayerNorm and the loss run through the ``kernels`` API (``kernels.causal_attention``,
``kernels.layer_norm``, ``kernels.add_layer_norm``, ``kernels.linear_cross_entropy``), so the same model runs on the pure-PyTorch
reference on a laptop and on the Triton/CUDA kernels on a GPU.  Module and parameter names match
nanoGPT and Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight`` ...), which
is what lets ``GPT.from_pretrained`` / ``save_pretrained`` (``llm/hf.py``) read and write
Hugging Face checkpoints with a plain key-to-key mapping.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels

__all__ = ["GPTConfig", "PRESETS", "GPT", "KVCache", "LayerNorm", "CausalSelfAttention", "MLP", "Block"]

# Architecture presets.  The four GPT-2 sizes are OpenAI's (vocab 50257 is kept unpadded so that
# checkpoints load without surgery); "tiny" is for unit tests and "cpu-small" is the default model
# that learns tinyshakespeare visibly in a few minutes on 2 CPU cores.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124.4M parameters (tied)
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 354.8M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774.0M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1557.6M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # 3.3M, 3.2M of them wte
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # 7.2M, 6.4M of them wte
}


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the position embedding covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding + residual dropout; none on attention probabilities (see attention)
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    tie_weights: bool = True  # lm_head.weight is transformer.wte.weight
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                "so that every head gets n_embd // n_head dims"
            )
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not (_is_real(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ValueError(f"GPTConfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")

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
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(fields))}"
            )
        return cls(**d)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.

    ``k[i]`` and ``v[i]`` are layer i's (B, nh, T_past, hs) tensors (None before the first forward).
    Each forward appends the new tokens' keys/values; ``length`` is T_past, which the model also
    uses as the position offset of the new tokens.  Growing by ``torch.cat`` copies the cache once
    per step, which costs the same order as the attention that reads it anyway, and keeps it simple.
    """

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        # The last layer is updated last, so mid-forward this still reads the length before the step.
        return 0 if self.k[-1] is None else self.k[-1].shape[2]

    def __len__(self) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, nh, T_new, hs) to layer ``layer``; return all keys/values (B, nh, T_past + T_new, hs)."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, nh, T_past + T_new, hs)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)


class LayerNorm(nn.Module):
    """Holds LayerNorm's weight and bias (named like nn.LayerNorm's) and calls ``kernels.layer_norm``.

    With ``bias=False`` the bias is a fixed zero buffer, not a parameter: the kernel API always takes
    a bias, and a non-persistent buffer keeps it out of the state dict and the optimizer.
    """

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        if bias:
            self.bias = nn.Parameter(torch.zeros(ndim))
        else:
            self.register_buffer("bias", torch.zeros(ndim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)  # (..., C)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x + residual), x + residual)`` as one fused op (``kernels.add_layer_norm``)."""
        return kernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps)  # (..., C) each


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one Linear makes q, k, v for all heads, one projects back.

    The kernel API has no dropout on the attention probabilities, so ``config.dropout`` is applied
    only after the output projection (GPT-2's ``resid_pdrop``), not to the probabilities (``attn_pdrop``).
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, T_past + T, hs)
        # The mask is aligned bottom-right, so the T new queries see every cached key plus the new
        # keys up to their own position; with no cache this is the ordinary causal mask.
        y = kernels.causal_attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new"); the exact erf form
        # would not reproduce the released checkpoints' logits to fp32 tolerance.
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: LayerNorm before each sublayer, identity on the residual path."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), kv_cache)  # (B, T, C)
        # x = x + a; h = ln_2(x) -- fused, so x and a are read once.  Under autocast a comes out of the
        # projection in bf16 while the residual stream x stays fp32: add in fp32, as `x + a` would.
        h, x = self.ln_2.add_forward(a.to(x.dtype), x)  # (B, T, C) each
        return x + self.mlp(h)  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Activation checkpointing per block (training only): a run setting, not part of the config.
        self.activation_checkpointing = False
        if config.tie_weights:
            # Weight tying (Press & Wolf 2017): one (V, C) matrix embeds tokens and scores them,
            # saving V*C parameters (38.6M of GPT-2's 124M).
            self.lm_head.weight = self.transformer.wte.weight

        # GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the two projections that
        # write into the residual stream scaled by 1/sqrt(2 * n_layer) so that the residual's
        # variance does not grow with depth (each block adds two such terms).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters, shared (tied) ones counted once.

        ``non_embedding=True`` leaves out the lookup tables, as scaling-law papers count: the
        position embedding always, the token embedding only when untied (tied, it is also the LM
        head's weight and does real matmul work, so it stays in -- nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if self.lm_head.weight is not self.transformer.wte.weight:
                n -= self.transformer.wte.weight.numel()
        return n

    def untie_weights(self) -> None:
        """Give lm_head its own copy of the token embedding (e.g. before fine-tuning the head alone)."""
        if self.lm_head.weight is self.transformer.wte.weight:
            self.lm_head.weight = nn.Parameter(self.transformer.wte.weight.detach().clone())
        self.config = dataclasses.replace(self.config, tie_weights=False)

    def _embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """``wte(idx)``, (B, T) -> (B, T, C).

        On a CPU, with the head tied to the embedding, the lookup's gradient is a sparse tensor (the
        rows of the B*T tokens seen) that autograd adds into the head's dense (V, C) gradient.  The
        dense form would zero a second (V, C) matrix, scatter B*T rows into it and add the two: two
        extra passes over 154 MB per GPT-2 step, ~30-60 ms of a ~1 s step on 2 cores.  Untied, the
        gradient stays dense (a sparse ``.grad`` is something AdamW cannot take); on a GPU the passes
        cost next to nothing, and dense keeps torch.compile and FSDP on their well-trodden path.
        """
        wte = self.transformer.wte.weight
        sparse = idx.device.type == "cpu" and self.lm_head.weight is wte and not torch.compiler.is_compiling()
        return F.embedding(idx, wte, sparse=sparse)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        ignore_index: int = -100,
        kv_cache: KVCache | None = None,
        return_logits: bool | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) int64 token ids -> (logits (B, T, V) or None, loss scalar or None).

        With ``targets`` (B, T) the loss is ``kernels.linear_cross_entropy`` of the final hidden
        states against the LM head weight (the fused kernel never builds the (B*T, V) logits), and
        logits are only computed when ``return_logits=True``.  Without targets, logits are returned
        unless ``return_logits=False``.  With ``kv_cache`` the T tokens continue the cached ones:
        their positions start at ``kv_cache.length`` and the cache grows by T.  ``last_only=True``
        computes the logits of the last position only, (B, 1, V): all that sampling the next token
        needs, without a (B, T, V) tensor (200 MB for T = 1024 in fp32).
        """
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T) token ids with T >= 1, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0
        if kv_cache is not None:
            if len(kv_cache.k) != self.config.n_layer:
                raise ValueError(f"kv_cache has {len(kv_cache.k)} layers, the model has {self.config.n_layer}")
            past = kv_cache.length
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} + kv cache length {past} = {past + T} exceeds block_size "
                f"{self.config.block_size}; crop the input to the last {self.config.block_size - past} tokens"
            )

        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self._embed_tokens(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.transformer.drop(x)
        checkpoint = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            if checkpoint:
                # Keep only the block's input for backward and run its forward again there: the
                # activations of one block at a time instead of all of them, for ~1/3 more compute.
                # Non-reentrant (the form torch.compile and every kernels backend support); the
                # RNG state is saved and restored, so dropout draws the same masks both times.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, kv_cache)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)

        if return_logits is None:
            return_logits = targets is None
        if return_logits:
            logits = self.lm_head(x[:, -1:, :] if last_only else x)  # (B, 1, V) or (B, T, V)
        else:
            logits = None
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            w = self.lm_head.weight
            if torch.is_autocast_enabled(x.device.type):
                # The residual stream (and so ln_f's output) stays fp32 under autocast, but the
                # lm_head Linear would run in the autocast dtype: give the fused head + loss the
                # same low-precision inputs (the kernels do the softmax and the loss in fp32).
                dtype = torch.get_autocast_dtype(x.device.type)
                x, w = x.to(dtype), w.to(dtype)
            elif w.dtype != x.dtype:  # e.g. a bf16 model fed fp32 hidden states
                w = w.to(x.dtype)
            loss = kernels.linear_cross_entropy(x, w, targets, ignore_index=ignore_index)
        return logits, loss

    # ---- Hugging Face GPT-2 checkpoints (the mapping lives in llm/hf.py) -----------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, **overrides) -> GPT:
        """Load a Hugging Face GPT-2 checkpoint directory (or a hub name when online); see ``llm.hf``."""
        from .hf import load_pretrained

        return load_pretrained(name_or_dir, **overrides)

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that ``transformers.GPT2LMHeadModel`` loads; see ``llm.hf``."""
        from .hf import save_pretrained

        save_pretrained(self, save_dir)
