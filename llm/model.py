"""GPT-2, readable in one sitting -- and the few changes that make the same code Llama 3 or Qwen3.

    token ids (B, T)
      -> wte(idx) (+ wpe(pos), GPT-2 only)        token (+ position) embeddings    (B, T, C)
      -> n_layer x Block:                         pre-norm transformer blocks
             x = x + attn(ln_1(x))                causal self-attention (RoPE on q and k: Llama, Qwen3)
             x = x + mlp(ln_2(x))                 GELU or SwiGLU MLP
      -> ln_f                                     final norm                       (B, T, C)
      -> lm_head (tied to wte by default)         logits                           (B, T, V)

Llama 3 and Qwen3 are this GPT with other choices, each a GPTConfig field (the defaults are GPT-2's):

    GPT-2                        Llama 3 / Qwen3                               GPTConfig
    LayerNorm (weight, bias)     RMSNorm (weight only)                         norm="rmsnorm"
    learned position table wpe   rotary embedding (RoPE) of q and k            pos_emb="rope", rope_theta, rope_scaling
    Linear -> GELU -> Linear     Linear(C, 2I) -> silu(gate) * up -> Linear    mlp="swiglu", intermediate_size
    n_head key/value heads       fewer, each shared by a group of q heads      n_kv_head (grouped-query attention)
    head_dim = n_embd / n_head   any head_dim (Qwen3-0.6B: 16 x 128 > 1024)    head_dim
    biases                       none                                          bias=False
                                 RMSNorm of each head's q and k (Qwen3)        qk_norm=True

Attention, the norms, RoPE, SwiGLU and the loss run through the ``kernels`` API (``kernels.causal_attention``,
``kernels.layer_norm`` / ``add_layer_norm``, ``kernels.rms_norm`` / ``add_rms_norm``, ``kernels.rope``,
``kernels.swiglu``, ``kernels.linear_cross_entropy``), so the same model runs on the pure-PyTorch
reference on a laptop and on the Triton/CUDA kernels on a GPU.  Module and parameter names match
nanoGPT and Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight`` ...), which
is what lets ``GPT.from_pretrained`` / ``save_pretrained`` (``llm/hf.py``) read and write
Hugging Face checkpoints with a plain key-to-key mapping (Llama's separate q/k/v and gate/up
projections are stacked into ``c_attn`` and ``c_fc`` there).  The config and its presets are in
``llm/config.py``, the rotation angles of RoPE in ``llm/rope.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels

from .config import PRESETS, GPTConfig
from .rope import RotaryEmbedding

__all__ = ["GPTConfig", "PRESETS", "GPT", "KVCache", "LayerNorm", "RMSNorm", "CausalSelfAttention", "MLP", "Block"]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.

    ``k[i]`` and ``v[i]`` are layer i's (B, n_kv_head, T_past, head_dim) tensors (None before the
    first forward): only the key/value heads, so grouped-query attention shrinks the cache by
    n_head / n_kv_head, and with RoPE the keys as rotated for their own positions, which never change.
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
        """Append k, v (B, nkv, T_new, hs) to layer ``layer``; return all keys/values (B, nkv, T_past + T_new, hs)."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, nkv, T_past + T_new, hs)
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


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), Llama's and Qwen's norm: ``x / sqrt(mean(x**2) + eps) * weight``.

    LayerNorm without the mean subtraction and without the bias -- a weight is all it holds.
    """

    def __init__(self, ndim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)  # (..., C)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x + residual), x + residual)`` as one fused op (``kernels.add_rms_norm``)."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)  # (..., C) each


def make_norm(config: GPTConfig, ndim: int) -> LayerNorm | RMSNorm:
    """The block's and the final norm: GPT-2's LayerNorm or Llama's RMSNorm, per ``config.norm``."""
    if config.norm == "rmsnorm":
        return RMSNorm(ndim, eps=config.norm_eps)
    return LayerNorm(ndim, bias=config.bias, eps=config.norm_eps)


class CausalSelfAttention(nn.Module):
    """Causal self-attention: one Linear makes q, k, v for all heads, one projects back.

    With ``n_kv_head < n_head`` (grouped-query attention, Ainslie et al. 2023) there are fewer key
    and value heads than query heads; query head h reads k/v head h // (n_head / n_kv_head), which
    ``kernels.causal_attention`` does without copying k and v.  c_attn's output rows are the query
    heads, then the key heads, then the value heads, head_dim rows each.

    The kernel API has no dropout on the attention probabilities, so ``config.dropout`` is applied
    only after the output projection (GPT-2's ``resid_pdrop``), not to the probabilities (``attn_pdrop``).
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3: q and k of every head RMS-normalized over head_dim (one weight per layer)
            self.q_norm = RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, eps=config.norm_eps)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).  ``rope``: (cos, sin), each (T, head_dim / 2), the angles of the
        T tokens' positions (None: GPT-2, whose positions came in with the embeddings)."""
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        q = q.view(B, T, nh, hs)  # (B, T, nh, hs)
        k = k.view(B, T, nkv, hs)  # (B, T, nkv, hs)
        v = v.view(B, T, nkv, hs)  # (B, T, nkv, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over each head's hs dims
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), 2 x (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope  # (T, hs/2) each
            q, k = kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)  # each pair of dims turned by its angle
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, T_past + T, hs)
        # The mask is aligned bottom-right, so the T new queries see every cached key plus the new
        # keys up to their own position; with no cache this is the ordinary causal mask.
        y = kernels.causal_attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh*hs): heads side by side again
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """GPT-2: ``Linear(C, I) -> GELU -> Linear(I, C)``.  SwiGLU (Shazeer 2020; Llama, Qwen): c_fc makes
    two I-wide halves, gate and up, and ``silu(gate) * up -> Linear(I, C)``: the gate decides, per hidden
    unit and token, how much of ``up`` passes."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        I = config.intermediate_size  # noqa: E741
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(config.n_embd, 2 * I if self.swiglu else I, bias=config.bias)  # rows [gate | up]
        self.c_proj = nn.Linear(I, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, I), or (B, T, 2I) for SwiGLU
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, I) each
            h = kernels.swiglu(gate, up)  # (B, T, I)
        else:
            # GPT-2 was trained with the tanh approximation of GELU ("gelu_new"); the exact erf form
            # would not reproduce the released checkpoints' logits to fp32 tolerance.
            h = F.gelu(h, approximate="tanh")  # (B, T, I)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: a norm before each sublayer, identity on the residual path."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        a = self.attn(self.ln_1(x), kv_cache, rope)  # (B, T, C)
        # x = x + a; h = ln_2(x) -- fused, so x and a are read once.  Under autocast a comes out of the
        # projection in bf16 while the residual stream x stays fp32: add in fp32, as `x + a` would.
        h, x = self.ln_2.add_forward(a.to(x.dtype), x)  # (B, T, C) each
        return x + self.mlp(h)  # (B, T, C)


class GPT(nn.Module):
    # On a CPU with a tied head, the token lookup's gradient is sparse inside autograd (_embed_tokens);
    # False forces the dense form (llm.train.memory.measure_peak does, as its tracker cannot follow sparse tensors).
    sparse_embedding_grad: bool = True

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)
        # RoPE has no table to learn: the angles follow from the config (llm/rope.py).
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling) \
            if config.pos_emb == "rope" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Activation checkpointing per block (training only): a run setting, not part of the config.
        self.activation_checkpointing = False
        if config.tie_weights:
            # Weight tying (Press & Wolf 2017): one (V, C) matrix embeds tokens and scores them,
            # saving V*C parameters (38.6M of GPT-2's 124M).
            self.lm_head.weight = self.transformer.wte.weight

        # GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the two projections that
        # write into the residual stream scaled by 1/sqrt(2 * n_layer) so that the residual's
        # variance does not grow with depth (each block adds two such terms).  The norms' weights
        # start at 1.  (Llama and Qwen3 are used here with the same recipe; they ship as weights.)
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
        position embedding always (RoPE has none), the token embedding only when untied (tied, it is
        also the LM head's weight and does real matmul work, so it stays in -- nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
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
        sparse = (self.sparse_embedding_grad and idx.device.type == "cpu" and self.lm_head.weight is wte
                  and not torch.compiler.is_compiling())
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
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) int64 token ids -> (logits (B, T, V) or None, loss scalar or None).

        With ``targets`` (B, T) the loss is ``kernels.linear_cross_entropy`` of the final hidden
        states against the LM head weight (the fused kernel never builds the (B*T, V) logits), and
        logits are only computed when ``return_logits=True``.  Without targets, logits are returned
        unless ``return_logits=False``.  With ``kv_cache`` the T tokens continue the cached ones:
        their positions start at ``kv_cache.length`` and the cache grows by T.  ``last_only=True``
        computes the logits of the last position only, (B, 1, V): all that sampling the next token
        needs, without a (B, T, V) tensor (200 MB for T = 1024 in fp32).  ``return_hidden=True``
        returns ``(final hidden states (B, T, C), None)`` and skips the head: what ``llm/scoring.py``
        applies the head to in chunks (a keyword, so it passes through DDP and torch.compile wrappers).
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

        x = self._embed_tokens(idx)  # (B, T, C)
        rope = None
        if self.rotary is None:  # GPT-2: add the learned embedding of each position
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        else:  # RoPE: positions enter in attention, where q and k are turned by angles that grow with them
            rope = self.rotary(past, T)  # (cos, sin), (T, head_dim/2) each, of positions past .. past + T - 1
        x = self.transformer.drop(x)
        checkpoint = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            if checkpoint:
                # Keep only the block's input for backward and run its forward again there: the
                # activations of one block at a time instead of all of them, for ~1/3 more compute.
                # Non-reentrant (the form torch.compile and every kernels backend support); the
                # RNG state is saved and restored, so dropout draws the same masks both times.
                x = torch.utils.checkpoint.checkpoint(block, x, rope=rope, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, kv_cache, rope)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if return_hidden:
            return x, None

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

    # ---- Hugging Face checkpoints (the mapping lives in llm/hf.py) ------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, **overrides) -> GPT:
        """Load a Hugging Face checkpoint directory (or a hub name when online); see ``llm.hf``."""
        from .hf import load_pretrained

        return load_pretrained(name_or_dir, **overrides)

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that ``transformers`` loads; see ``llm.hf``."""
        from .hf import save_pretrained

        save_pretrained(self, save_dir)
