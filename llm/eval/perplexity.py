"""Perplexity: exp of the mean next-token cross-entropy of a model over a token stream.

A text longer than the context is scored in windows of ``block_size`` tokens that start every
``stride`` tokens (Hugging Face's "perplexity of fixed-length models" recipe)::

    tokens      t0 t1 t2 t3 t4 t5 t6 t7 t8 t9            block 4, stride 2
    window 1    [t0 t1 t2 t3]         scores t1..t4      (every target of the first window)
    window 2          [t2 t3 t4 t5]   scores t5 t6       (only its last `stride` targets)
    window 3                [t4 ...]  scores t7 t8 ...

Every target token is scored exactly once (N tokens give N - 1 targets).  ``stride = block_size``
(the default) is non-overlapping windows: fastest, but the first tokens of each window see little
context.  A smaller stride gives every scored token at least ``block_size - stride`` tokens of
context, which lowers the perplexity towards what an unbounded context would give, at
``block_size / stride`` times the compute.  The last window may be shorter, as in that recipe.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import as_token_array, prepare
from ..data.tokenfiles import check_tokenizer, open_prepared, prepared_folder, token_dtype

__all__ = ["load_tokens", "perplexity", "window_plan"]

TOKEN_FILE_SUFFIXES = (".bin", ".npy")


def load_tokens(source: str, *, split: str = "all", val_fraction: float = 0.1, progress: bool = True,
                tokenizer=None) -> np.ndarray:
    """The 1-D token stream of ``source``, tokenized by ``tokenizer`` (default GPT-2's).

    ``.bin`` (flat uint16, or uint32 for a vocabulary over 65,536 ids: what ``llm.data.prepare``
    writes; the meta.json beside it, when there is one, gives the dtype and is checked to name
    ``tokenizer``) and ``.npy`` files are token files, used as they are; so is a folder that
    ``llm prepare`` wrote (``split`` picks from its own split).  Anything else is a corpus source for
    ``llm.data.prepare`` (a corpus name, a text file, a folder, a glob, ``hf:...``): it is tokenized
    (once, cached) and ``split`` picks ``"all"`` of it, or the ``"train"`` / ``"val"`` part of a
    ``val_fraction`` split -- the same split training made when it used the same ``val_fraction``.
    """
    if split not in ("all", "train", "val"):
        raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
    path = Path(os.path.expanduser(source))
    if path.suffix in TOKEN_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"no such token file: {source}")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        else:
            tokens = _read_bin(path, tokenizer)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{source}: token ids must be integers, got dtype {tokens.dtype}")
        return as_token_array(tokens)
    folder = prepared_folder(source)
    if folder is not None:
        from ..tokenizer import get_tokenizer

        prepared = open_prepared(folder, tokenizer or get_tokenizer())
        if split == "all":
            return np.concatenate([prepared.train_tokens(), prepared.val_tokens()])
        return prepared.val_tokens() if split == "val" else prepared.train_tokens()
    # "all" needs no split, but prepare always makes one; train + val is the whole stream in order.
    prepared = prepare(source, val_fraction=0.0 if split == "all" else val_fraction, progress=progress,
                       tokenizer=tokenizer)
    return prepared.val_tokens() if split == "val" else prepared.train_tokens()


def _read_bin(path: Path, tokenizer) -> np.ndarray:
    """A flat token file: of the dtype its folder's meta.json gives (after checking the tokenizer),
    else of the dtype ``llm prepare`` would have written for ``tokenizer`` (uint16 when None)."""
    meta_path = path.parent / "meta.json"
    if meta_path.is_file():
        import json

        meta = json.loads(meta_path.read_text())
        if tokenizer is not None:
            check_tokenizer(meta, tokenizer, f"{path} (see {meta_path})")
        dtype = np.dtype(meta.get("dtype", "uint16"))
    else:
        dtype = token_dtype(tokenizer.n_vocab) if tokenizer is not None else np.dtype(np.uint16)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path}: size {size} is not a whole number of {dtype.name} tokens")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def window_plan(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: inputs ``tokens[begin:end]``, targets
    ``tokens[begin + 1:end + 1]``, of which those at token positions ``>= first_scored`` count.

    The scored ranges ``[first_scored, end]`` tile ``1 .. n_tokens - 1`` exactly once.
    """
    if block_size < 1 or stride < 1:
        raise ValueError(f"block_size and stride must be >= 1, got {block_size} and {stride}")
    if stride > block_size:
        raise ValueError(f"stride ({stride}) > block_size ({block_size}) would skip tokens")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (one input, one target), got {n_tokens}")
    last = n_tokens - 1  # position of the last target token
    plan, prev_end, begin = [], 0, 0
    while prev_end < last:
        end = min(begin + block_size, last)
        plan.append((begin, end, prev_end + 1))
        prev_end, begin = end, begin + stride
    return plan


@torch.no_grad()
def perplexity(
    model,
    tokens,
    *,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """{loss (mean nats per token), perplexity (exp of it), tokens (how many were scored)}.

    ``tokens``: a 1-D stream (NumPy array, memmap, tensor or list of ids).  ``block_size`` defaults
    to the model's and may not exceed it; ``stride`` defaults to ``block_size``.  Windows of the
    same length are batched ``batch_size`` at a time; the loss is the model's own (fused) loss.
    """
    tokens = as_token_array(tokens)
    model_block = model.config.block_size
    block_size = model_block if block_size is None else block_size
    if block_size > model_block:
        raise ValueError(f"block_size {block_size} exceeds the model's context of {model_block} tokens")
    stride = block_size if stride is None else stride
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = window_plan(len(tokens), block_size, stride)
    if len(tokens) and (int(tokens.max()) >= model.config.vocab_size or int(tokens.min()) < 0):
        raise ValueError(f"token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the model's "
                         f"vocabulary of {model.config.vocab_size}")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    # Full-length windows share a batch; only the last window can be shorter, and it goes alone.
    batches = [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]
    bar = tqdm(total=len(tokens) - 1, unit="tok", desc="perplexity", disable=not progress)
    try:
        for batch in batches:
            for group in _same_length(batch):
                x, y = _windows(tokens, group, device)  # (b, T) each
                _, loss = model(x, y)  # mean over the scored (not -100) targets
                n = int((y != -100).sum())
                total_nats += float(loss) * n
                total_tokens += n
                bar.update(n)
    finally:
        bar.close()
        model.train(was_training)
    mean = total_nats / total_tokens
    # exp overflows a float past a mean loss of ~709.8 nats: the perplexity is then reported as inf
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 709.0 else float("inf"), "tokens": total_tokens}


def _same_length(windows: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    return list(groups.values())


def _windows(tokens: np.ndarray, group: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of equal-length windows, targets before ``first_scored`` set to -100."""
    rows = np.stack([np.asarray(tokens[b:e + 1], dtype=np.int64) for b, e, _ in group])  # (b, T + 1)
    rows = torch.from_numpy(rows)
    x, y = rows[:, :-1].clone(), rows[:, 1:].clone()  # (b, T) each; y[i, j] is token b_i + j + 1
    for i, (begin, _, first) in enumerate(group):
        y[i, : first - begin - 1] = -100  # targets at positions < first were scored by an earlier window
    return x.to(device), y.to(device)
