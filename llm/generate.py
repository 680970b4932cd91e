"""Autoregressive text generation: sampling rules, a KV-cached decoding loop, and batched prompts.

    sample_next(logits, temperature=, top_k=, top_p=)   one token per row from (B, V) logits
    stream(model, idx, n, ...)                           yields each new (B,) token as it is made
    generate(model, idx, n, ...)                         the whole (B, T + n) sequence
    generate_text(model, tokenizer, prompts, ...)        strings in, completions out
    stream_text(model, tokenizer, prompt, ...)           text pieces as they are made (for a CLI)

With the KV cache (the default) the prompt is run once ("prefill") and every later step feeds only
the newest token, reusing the keys and values of the earlier ones; the output is the same as
recomputing the whole context each step, only faster.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .model import GPT, KVCache

__all__ = ["sample_next", "stream", "generate", "generate_text", "stream_text"]


def _check_sampling_args(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if top_p is not None and float(torch.tensor(top_p, dtype=torch.float32)) < torch.finfo(torch.float32).tiny:
        raise ValueError(f"top_p {top_p!r} underflows in float32, where the probabilities are compared (the "
                         f"smallest is {torch.finfo(torch.float32).tiny:.3g}): every token would be dropped; "
                         "for the single most likely token use top_k=1 (--top-k 1) or temperature 0")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V); returns a LongTensor (B,).

    temperature 0 is greedy (argmax).  Otherwise the logits are divided by the temperature, then
    top_k keeps the k most likely tokens and top_p (nucleus sampling) keeps the smallest set of most
    likely tokens whose probabilities sum to at least top_p; the token is drawn from what is left.
    ``generator`` (on the logits' device) makes the draw reproducible.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, V); fp32 so that softmax of bf16 logits is not coarse
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        # Drop a token when the tokens strictly more likely than it already reach top_p; the most
        # likely token is therefore always kept.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens new tokens, one (B,) LongTensor per step, continuing idx (B, T).

    A row that produced ``eos_token_id`` is finished: it yields eos from then on, and the stream
    ends early once every row is finished.  The model runs in eval mode while the stream is open
    and gets its previous mode back when the stream ends (or is closed).

    Context longer than block_size: the prompt keeps its last block_size tokens.  Once the sequence
    fills the block, a KV cache cannot take more (the position embedding ends there and the cached
    keys were computed for positions that would now shift), so each further step recomputes the
    last block_size tokens without a cache -- exactly what the uncached path (nanoGPT's cropping)
    does, so the two agree token for token.
    """
    _check_sampling_args(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T) token ids with T >= 1, got shape {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    # Validation above runs at call time; the loop below is a generator, so it runs on iteration.
    return _stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, use_cache, generator)


@torch.no_grad()  # on a generator function torch applies it around each step, not to the caller
def _stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, use_cache, generator):
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        seq = idx  # (B, T) everything so far
        cache = KVCache(model.config.n_layer) if use_cache else None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
        for step in range(max_new_tokens):
            if step == 0 or cache is None or cache.length >= block_size:
                # Prefill, no cache, or a full cache: run the (cropped) context from scratch.
                context = seq[:, -block_size:]  # (B, <= block_size)
                use = cache if cache is not None and step == 0 else None
                logits, _ = model(context, kv_cache=use, last_only=True)  # (B, 1, V)
            else:
                logits, _ = model(seq[:, -1:], kv_cache=cache)  # (B, 1, V): only the newest token
            next_token = sample_next(
                logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )  # (B,)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            yield next_token
            seq = torch.cat([seq, next_token[:, None]], dim=1)  # (B, T + step + 1)
            if eos_token_id is not None and bool(finished.all()):
                return
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (fewer when every row hit eos).

    Keyword arguments are ``stream``'s: temperature, top_k, top_p, eos_token_id, use_cache, generator.
    Rows that finish early are padded with eos_token_id.
    """
    new = list(stream(model, idx, max_new_tokens, **kwargs))
    if not new:
        return idx.clone()
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)  # (B, T) + (B, n) -> (B, T + n)


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    # An empty prompt still needs one token to condition on: GPT-2 starts documents after <|endoftext|>.
    # (A tokenizer.json without an end-of-text token raises a ValueError here that says so.)
    return ids if ids else [tokenizer.eot_token]


def _default_eos(tokenizer) -> int | None:
    """The tokenizer's end-of-text id, or None when it has none (then generation runs to max_new_tokens).

    ``eos_token_id`` is None for a tokenizer.json without one, where reading ``eot_token`` raises;
    simpler tokenizers (the tests' byte tokenizers) have only ``eot_token``.
    """
    if hasattr(tokenizer, "eos_token_id"):
        return tokenizer.eos_token_id
    return getattr(tokenizer, "eot_token", None)


def _cut_at_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    return ids[: ids.index(eos_token_id)] if eos_token_id is not None and eos_token_id in ids else ids


def generate_text(
    model: GPT, tokenizer, prompts: list[str] | str, max_new_tokens: int = 100, **kwargs
) -> list[str]:
    """Complete each prompt; returns the completions (without the prompt) in the prompts' order.

    Rows of a batch share one position offset and the attention kernel takes no padding mask, so
    prompts of different token lengths cannot share a batch: prompts are grouped by token length,
    each group is one batch, and groups run one after another.  Generation stops at the tokenizer's
    ``eot_token`` unless ``eos_token_id`` is passed (None disables it); the eos is not in the text.
    Other keyword arguments go to ``stream`` (temperature, top_k, top_p, use_cache, generator).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    kwargs.setdefault("eos_token_id", _default_eos(tokenizer))
    device = next(model.parameters()).device
    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    groups: dict[int, list[int]] = {}  # token length -> indices of the prompts that have it
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out: list[str | None] = [None] * len(prompts)
    for length, members in groups.items():
        idx = torch.tensor([encoded[i] for i in members], dtype=torch.long, device=device)  # (b, length)
        result = generate(model, idx, max_new_tokens, **kwargs)  # (b, length + n)
        for row, i in enumerate(members):
            new_ids = _cut_at_eos(result[row, length:].tolist(), kwargs["eos_token_id"])
            out[i] = tokenizer.decode(new_ids)
    return out


def stream_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 100, **kwargs) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece, as it is generated (for a CLI to print).

    A BPE token can end in the middle of a multi-byte UTF-8 character, so decoding token by token
    would print replacement characters; instead the text decoded so far is compared with what was
    already yielded, and a piece is held back while it ends in an incomplete character.
    """
    kwargs.setdefault("eos_token_id", _default_eos(tokenizer))
    device = next(model.parameters()).device
    idx = torch.tensor([_encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)  # (1, T)
    new_ids: list[int] = []
    emitted = ""
    for token in stream(model, idx, max_new_tokens, **kwargs):
        if kwargs["eos_token_id"] is not None and int(token[0]) == kwargs["eos_token_id"]:
            break
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character; wait for the next token
            continue
        if text.startswith(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(new_ids)
    if text != emitted and text.startswith(emitted):
        yield text[len(emitted):]
