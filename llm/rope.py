"""Rotary position embedding (RoPE, Su et al. 2021): where Llama and Qwen3 put the positions.

GPT-2 adds a learned vector per position to the token embedding.  RoPE instead turns q and k: the
head's D dims are D/2 planes (dim i pairs with dim i + D/2, Hugging Face's "rotate half" layout), and
at position p plane i is rotated by the angle ``p * inv_freq[i]``, ``inv_freq[i] = theta**(-2i/D)``.
A rotation by a and one by b meet in q . k as a rotation by a - b, so attention scores depend on how
far apart two tokens are, not on where they stand; nothing is learned, and nothing limits T but
``block_size``.  Plane 0 turns by one radian per token; the last planes take about 2 pi theta tokens per turn.

This file makes the angles: ``rope_inv_freq`` the frequencies (with Llama 3's long-context scaling),
``RotaryEmbedding`` their cos and sin for the positions of a forward; ``kernels.rope`` turns q and k.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["rope_inv_freq", "RotaryEmbedding"]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The head_dim/2 angular frequencies of RoPE, fp32, on the CPU: ``theta ** (-2i / head_dim)``.

    ``scaling`` is Llama 3.1's ``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``, computed exactly as Hugging Face's
    ``_compute_llama3_parameters``: of the wavelengths ``2 pi / inv_freq``, those shorter than
    original_max / high_freq_factor (the fast, local dims) are kept, those longer than original_max /
    low_freq_factor are slowed down by ``factor`` (so 8192 trained positions stretch to 8192 * factor),
    and the ones between blend the two linearly in ``original_max / wavelength``.  The same arithmetic
    in the same order, in fp32 on the CPU, gives bit for bit Hugging Face's frequencies.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq  # (head_dim/2,)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq  # (head_dim/2,) tokens per turn
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long waves slowed down
    smooth = (old_context / wavelen - low) / (high - low)  # 0 at low_freq_wavelen .. 1 at high_freq_wavelen
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, blended, scaled)  # (head_dim/2,)


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotation angles of T positions from ``past`` on: ``rotary(past, T)`` ->
    two (T, head_dim/2) fp32 tensors, the form ``kernels.rope`` takes.  ``past`` is the KV cache's
    length, so a decoded token is turned for its real position."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        # Non-persistent: it follows from the config, so it is in no state dict or checkpoint.  Made on
        # the device parameters are being made on (``with torch.device("meta"): GPT(config)`` included).
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating buffer, and frequencies rounded to bf16 would
        # turn position 1000 by up to ~4 radians off; model.to_empty() would leave garbage.  Whatever
        # moved or cast the module, put the exact fp32 frequencies back on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.inv_freq.device)
        return self

    def forward(self, past: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(past, past + T, dtype=torch.float32, device=self.inv_freq.device)  # (T,)
        angles = pos[:, None] * self.inv_freq[None, :]  # (T, head_dim/2): position p, plane i -> p * inv_freq[i]
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}, scaling={self.scaling}"
