"""From a token stream to training batches ``(x, y)`` where ``y`` is ``x`` shifted by one.

Two ways to cut windows out of the stream:

* :class:`SlidingWindowDataset` is the book's ``GPTDatasetV1``: windows of ``max_length`` tokens
  starting every ``stride`` tokens, to be fed to a ``torch.utils.data.DataLoader``.
* :class:`TokenLoader` is what the trainer uses.  It draws a batch per call, either random
  windows (``mode="random"``, nanoGPT's way: no notion of epochs, ideal for large corpora) or the
  book's sliding windows shuffled each epoch (``mode="sliding"``).  Every batch is a pure
  function of ``(seed, position)``, so its ``state_dict()`` is a handful of integers that resume
  the exact same sequence of batches, and under DDP every rank computes the same global batch and
  keeps its own slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

TokenStream = np.ndarray | torch.Tensor | Sequence[int]


def as_token_array(tokens: TokenStream) -> np.ndarray:
    """A 1-D NumPy view of ``tokens`` (memmaps stay memmaps, so nothing is read into RAM)."""
    if isinstance(tokens, torch.Tensor):
        arr = tokens.detach().cpu().numpy()
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {arr.shape}")
    return arr


def _check_length(n_tokens: int, block_size: int) -> None:
    if n_tokens < block_size + 1:
        raise ValueError(
            f"the token stream has {n_tokens} tokens, but one training window needs "
            f"block_size + 1 = {block_size + 1} (inputs plus the next-token target); "
            "use more data or a smaller block/context size"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[i] = tokens[s_i : s_i+T]``, ``y[i] = tokens[s_i+1 : s_i+T+1]``; both (len(starts), T) int64."""
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1]) for s in starts.tolist()])
    rows = torch.from_numpy(rows.astype(np.int64))
    # contiguous() because callers flatten targets with .view(-1) for the cross-entropy
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class SlidingWindowDataset(Dataset):
    """The book's ``GPTDatasetV1`` over an already tokenized stream.

    Item ``i`` is ``(x, y)``, two int64 tensors of shape ``(max_length,)`` with
    ``x = tokens[i*stride : i*stride + max_length]`` and ``y`` the same window moved one token on.
    """

    def __init__(self, tokens: TokenStream, max_length: int, stride: int) -> None:
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be >= 1, got {max_length}, {stride}")
        self.tokens = as_token_array(tokens)
        _check_length(len(self.tokens), max_length)
        self.max_length = max_length
        self.stride = stride
        # Same windows as the book's `for i in range(0, len(token_ids) - max_length, stride)`.
        self.starts = range(0, len(self.tokens) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _windows(self.tokens, np.array([self.starts[i]]), self.max_length)
        return x[0], y[0]


def create_dataloader(
    tokens: TokenStream,
    *,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int = 123,
) -> DataLoader:
    """The book's ``create_dataloader_v1`` on tokens: batches of (x, y), each (batch_size, max_length)."""
    generator = torch.Generator().manual_seed(seed)  # shuffle order independent of the global RNG
    return DataLoader(
        SlidingWindowDataset(tokens, max_length, stride),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


class TokenLoader:
    """Endless, deterministic, resumable batches for training.

    ``next_batch()`` returns ``(x, y)``, int64 CPU tensors of shape ``(batch_size, block_size)``
    with ``y[:, t] == x[:, t+1]`` within the stream.  Each call forms a *global* batch of
    ``batch_size * world_size`` windows and returns rows ``[rank*batch_size, (rank+1)*batch_size)``,
    so ``world_size`` ranks together see exactly what one rank with the whole global batch sees.

    * ``mode="random"``: window starts uniform in ``[0, len(tokens) - block_size - 1]``; batch ``k``
      comes from a NumPy generator seeded with ``(seed, k)``.
    * ``mode="sliding"``: the windows starting at ``0, stride, 2*stride, ...`` (``stride`` defaults
      to ``block_size``, i.e. no overlap), visited in an order shuffled per epoch with a generator
      seeded with ``(seed, epoch)``; a batch that runs past the end of an epoch continues into the
      next one.  ``shuffle=False`` visits them in order (handy for evaluation).

    The global RNG is never touched, and ``state_dict()`` captures the position exactly.
    """

    def __init__(
        self,
        tokens: TokenStream,
        batch_size: int,
        block_size: int,
        *,
        mode: Literal["random", "sliding"] = "random",
        stride: int | None = None,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if mode not in ("random", "sliding"):
            raise ValueError(f"mode must be 'random' or 'sliding', got {mode!r}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.tokens = as_token_array(tokens)
        _check_length(len(self.tokens), block_size)
        self.batch_size = batch_size
        self.block_size = block_size
        self.mode = mode
        self.stride = block_size if stride is None else stride
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.n_windows = len(range(0, len(self.tokens) - block_size, self.stride))
        # Position in the stream of batches: all that state_dict() needs.
        self.step = 0  # batches drawn so far
        self.epoch = 0  # sliding mode: current epoch and index into its window order
        self.index = 0
        self._order: np.ndarray | None = None  # cached window order of self.epoch
        self._order_epoch = -1

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)``, each ``(batch_size, block_size)`` int64, and advance by one batch."""
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, self.step])
            starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch_size)
        else:
            starts = self._next_sliding_starts()
        self.step += 1
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.block_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def _next_sliding_starts(self) -> np.ndarray:
        parts = []
        need = self.global_batch_size
        while need > 0:
            taken = self._epoch_order(self.epoch)[self.index : self.index + need]
            parts.append(taken)
            need -= len(taken)
            self.index += len(taken)
            if self.index == self.n_windows:  # epoch finished: the rest comes from the next one
                self.epoch += 1
                self.index = 0
        return np.concatenate(parts) * self.stride

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            "step": self.step,
            "epoch": self.epoch,
            "index": self.index,
            "block_size": self.block_size,
            "stride": self.stride,
            "n_tokens": len(self.tokens),
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batches equal those the saved loader would have given.

        The token stream, mode, block size, stride and global batch size must match (the world
        size may differ as long as ``batch_size * world_size`` is the same); the seed is taken
        from ``state``.
        """
        for key, mine in [
            ("mode", self.mode),
            ("block_size", self.block_size),
            ("n_tokens", len(self.tokens)),
            # batch_size * world_size: batch k is cut from the global batch, so this fixes the stream
            ("global_batch_size", self.global_batch_size),
        ] + ([("stride", self.stride)] if self.mode == "sliding" else []):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r}, but this loader has {mine!r}")
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._order_epoch = -1  # the seed may have changed


def _token_counts(tokens: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """How often each token id occurs in ``tokens``, an int64 array of length ``vocab_size``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 24  # bincount on slices, so a memmapped corpus is never loaded (as int64) whole
    for i in range(0, len(tokens), chunk):
        part = np.asarray(tokens[i : i + chunk])
        if part.size and int(part.max()) >= vocab_size:
            raise ValueError(f"{what} token id {int(part.max())} >= vocab_size {vocab_size}")
        counts += np.bincount(part, minlength=vocab_size)
    return counts


def unigram_loss(train_tokens: TokenStream, val_tokens: TokenStream, vocab_size: int = 50257) -> float:
    """Cross-entropy (nats per token) of ``val_tokens`` under the train unigram distribution.

    ``p(t) = (count_train(t) + 1) / (n_train + vocab_size)`` (add-one smoothing, so unseen tokens
    still get a finite loss).  A model that beats this number has learned more than token
    frequencies; one at ``ln(vocab_size)`` (10.82 for GPT-2) has learned nothing at all.
    """
    train = as_token_array(train_tokens)
    val = as_token_array(val_tokens)
    if len(val) == 0:
        raise ValueError("unigram_loss needs at least one validation token")
    log_p = np.log(_token_counts(train, vocab_size, "train") + 1.0) - np.log(len(train) + vocab_size)
    val_counts = _token_counts(val, vocab_size, "val")
    return float(-(val_counts * log_p).sum() / len(val))
