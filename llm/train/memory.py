"""How much memory a training run needs, before it starts, and whether the device has it.

    est = estimate_training_memory(model.config, n_params, batch_size=4, block_size=1024,
                                   precision="bfloat16", ce_backend="triton", attention_backend="triton")
    est.total(checkpointing=False), est.activations(checkpointing=True)

The estimate is the sum of what a step holds at its peak (the end of the forward, when every
activation saved for backward is alive and the gradients are about to be written):

* parameters, fp32 (autocast keeps the weights fp32), 4 bytes each;
* gradients, fp32, 4 bytes each (twice under DDP: its all-reduce buckets are a second copy);
* AdamW state: exp_avg and exp_avg_sq, fp32, 8 bytes per parameter;
* activations of one micro-batch: per layer and token, the values a block saves for backward
  (:func:`block_values_per_token`: the norms' inputs and outputs, the q/k/v projection, the rotated q
  and k with RoPE, the attention output, the MLP's hidden before and after GELU or SwiGLU) -- 16 C for
  GPT-2 --, all but 6 C of them 16-bit under autocast, plus
  the (H, T) attention probabilities where attention runs on the pure-PyTorch reference (every other
  backend keeps only the log-sum-exp); then the LM head and loss: the fused, chunked kernels (triton,
  cuda) hold one chunk of logits and its gradient, the others three or four (N, V) fp32 buffers.  With
  activation checkpointing a block keeps only its input: the peak is those inputs plus either the
  head (at the end of the forward) or the one block being recomputed in backward.

The coefficients were read off PyTorch's own memory tracker (``torch.distributed._tools.MemTracker``,
see :func:`measure_peak`) on CPU runs of each backend; tests/test_memory.py checks the estimate
against that measurement.  It is an estimate: torch.compile, allocator caching and fragmentation move
the real peak by tens of percent, so a configuration is refused only when even the estimate exceeds
the device's memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GiB = 1 << 30
FP32_VALUES_PER_TOKEN = 6  # x n_embd: of a block's saved values, those autocast keeps in fp32 (the norms')
# (N, V) fp32 buffers the unfused LM head + loss keeps alive (measured: torch 3.7, pytorch 2.7)
UNCHUNKED_LOGITS_COPIES = {"torch": 4, "pytorch": 3}
CHUNKED_BACKENDS = ("triton", "cuda")  # never form the (N, V) logits (kernels/_chunked_linear_ce.py)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, per process.  ``activations_full`` / ``activations_checkpointed`` are one micro-batch's."""

    params: int
    grads: int
    optimizer: int
    activations_full: int
    activations_checkpointed: int

    def activations(self, checkpointing: bool) -> int:
        return self.activations_checkpointed if checkpointing else self.activations_full

    def total(self, checkpointing: bool) -> int:
        return self.params + self.grads + self.optimizer + self.activations(checkpointing)

    def describe(self, checkpointing: bool, device: torch.device, capacity: int | None) -> str:
        on = "with" if checkpointing else "without"
        other = "without" if checkpointing else "with"
        of = f" of {device}'s {capacity / GiB:.1f} GiB" if capacity else f" ({device}'s memory unknown)"
        return (f"memory estimate: parameters {_gib(self.params)} + gradients {_gib(self.grads)} + AdamW state "
                f"{_gib(self.optimizer)} + activations {_gib(self.activations(checkpointing))} per micro-batch "
                f"({on} activation checkpointing; {_gib(self.activations(not checkpointing))} {other}) = "
                f"{_gib(self.total(checkpointing))}{of}")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def block_values_per_token(config) -> int:
    """How many numbers one transformer block saves for backward per token (GPT-2: 16 n_embd).

    4 C for the two norms' inputs and outputs; q, k and v (n_head + 2 n_kv_head) * head_dim; the
    attention output n_head * head_dim; with RoPE the rotated q and k (new tensors, the projection's
    stay saved too); the MLP's hidden: c_fc's output and the activation's, 2 I for GELU, 3 I for
    SwiGLU (gate and up, then silu(gate) * up).  Qwen3's q/k norms save nothing new but statistics.
    """
    C, I = config.n_embd, config.intermediate_size
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    values = 4 * C + (q + 2 * kv) + q
    if config.pos_emb == "rope":
        values += q + kv
    return values + (3 * I if config.mlp == "swiglu" else 2 * I)


def estimate_training_memory(config, n_params: int, *, batch_size: int, block_size: int, precision: str,
                             ce_backend: str, attention_backend: str, world_size: int = 1,
                             fsdp: bool = False) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of training a GPT of ``config`` (a :class:`llm.model.GPTConfig`)
    with ``n_params`` parameters on micro-batches of ``batch_size`` x ``block_size``.
    ``precision``: "float32", "bfloat16" or "float16"; ``*_backend``: the kernels backend that runs
    that op (``kernels.backends.backend_for``).  ``fsdp``: weights, gradients and AdamW state are
    sharded over ``world_size`` processes (llm/train/fsdp.py); the gathered block of the moment is
    left out, as it is small beside them."""
    N, C, L, V, H = batch_size * block_size, config.n_embd, config.n_layer, config.vocab_size, config.n_head
    lowp = precision != "float32"
    low_bytes = 2 if lowp else 4
    values = block_values_per_token(config)
    fp32_values = FP32_VALUES_PER_TOKEN * C if lowp else values
    block = N * (fp32_values * 4 + (values - fp32_values) * low_bytes)
    if attention_backend == "torch":  # the reference materialises softmax(QK^T) in fp32: scores and probabilities
        block += N * H * block_size * 2 * 4
        if config.n_kv_head < H:  # and, for grouped-query attention, k and v repeated to every query head
            block += N * 2 * H * config.head_dim * low_bytes
    if ce_backend in CHUNKED_BACKENDS:
        from kernels._chunked_linear_ce import rows_per_chunk

        head = 2 * rows_per_chunk(N, V, None) * V * low_bytes + N * C * 4  # a chunk's logits, dlogits; grad_h
    else:
        head = UNCHUNKED_LOGITS_COPIES.get(ce_backend, 4) * N * V * 4
    embed = 3 * N * C * 4  # token + position embeddings, ln_f
    grads = n_params * 4 * (2 if world_size > 1 and not fsdp else 1)
    shard = world_size if fsdp else 1
    return MemoryEstimate(
        params=n_params * 4 // shard, grads=grads // shard, optimizer=n_params * 8 // shard,
        activations_full=int(L * block + head + embed),
        # the blocks' inputs, and then either the head (end of forward) or one block being recomputed
        activations_checkpointed=int(L * N * C * 4 + embed + max(head, block)),
    )


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has (None when unknown): a CUDA GPU's total, what Metal recommends
    for MPS, the machine's physical RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory())
        except (AttributeError, RuntimeError):
            return None
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # Windows has no sysconf
            return None
    return None


def refusal(est: MemoryEstimate, *, checkpointing: bool, capacity: int | None, device: torch.device,
            batch_size: int, grad_accum_steps: int, precision: str) -> str | None:
    """Why the run cannot fit (with the flags that would make it fit), or None when it may."""
    if capacity is None or est.total(checkpointing) <= capacity:
        return None
    hints = []
    if not checkpointing and est.total(True) < est.total(False):
        fits = "fits" if est.total(True) <= capacity else "is still too big"
        hints.append(f"--activation-checkpointing (then {_gib(est.total(True))}: {fits})")
    if batch_size > 1:
        smaller = max(1, batch_size // 2)
        hints.append(f"--batch-size {smaller} --grad-accum-steps {grad_accum_steps * (batch_size // smaller)} "
                     "(the same tokens per step in smaller micro-batches)")
    if precision == "float32" and device.type == "cuda":
        hints.append("--dtype bfloat16 (or float16 on GPUs without bf16)")
    hints.append("a smaller model (--preset, --n-layer, --n-embd) or a shorter --block-size")
    return (f"this run needs about {_gib(est.total(checkpointing))} ({est.describe(checkpointing, device, capacity)}), "
            f"more than {device} has: try " + "; or ".join(hints) + ". (--no-memory-check runs it anyway.)")


def measure_peak(step, *modules: torch.nn.Module) -> int:
    """Peak bytes of tensors alive on the CPU while ``step()`` runs, by PyTorch's memory tracker
    (a dispatch mode that follows every tensor's storage; works where no allocator statistics
    exist, e.g. the CPU).  Counts the parameters of ``modules``, gradients, activations and
    temporaries alike."""
    from torch.distributed._tools.mem_tracker import MemTracker

    # The tracker cannot follow a sparse tensor's storage, and on a CPU a GPT with a tied head makes
    # its embedding's gradient sparse inside autograd (GPT._embed_tokens): measure the dense form, the
    # one every other device runs (it holds one more (V, C) matrix for a moment, so this errs high).
    gpts = [m for module in modules for m in module.modules() if hasattr(m, "sparse_embedding_grad")]
    saved = [m.sparse_embedding_grad for m in gpts]
    for m in gpts:
        m.sparse_embedding_grad = False
    try:
        tracker = MemTracker()
        tracker.track_external(*modules)
        with tracker:
            step()
    finally:
        for m, value in zip(gpts, saved):
            m.sparse_embedding_grad = value
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
