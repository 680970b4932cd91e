"""The GPT-2 byte-pair-encoding tokenizer (chapter 2 of the book).

We do not train our own BPE: GPT-2's vocabulary of 50,257 tokens is what the pretrained weights
expect, and OpenAI's ``tiktoken`` implements it in fast Rust.  This module wraps it in a small
:class:`Tokenizer` with the handful of methods the rest of the package uses::

    >>> tok = get_tokenizer()
    >>> tok.encode("Hello, world")
    [15496, 11, 995]
    >>> tok.decode([15496, 11, 995])
    'Hello, world'

``<|endoftext|>`` (id 50256) separates documents when we concatenate a corpus into one token
stream, so by default it is recognised when it appears literally in the text.

tiktoken downloads the two vocabulary files (``vocab.bpe`` and ``encoder.json``) on first use and
caches them in ``$TIKTOKEN_CACHE_DIR``.  On a machine without internet, put those files there
yourself (see :data:`GPT2_VOCAB_FILES`); otherwise :func:`get_tokenizer` raises a
``RuntimeError`` that says so instead of a long network traceback.

Other tokenizers (Llama 3's, Qwen3's, one you trained) load from a Hugging Face ``tokenizer.json``:
``get_tokenizer(path)`` with the file or a folder that holds it returns an
:class:`~llm.hf_tokenizer.HFTokenizer`, which has the same methods.  Every command takes such a
path as ``--tokenizer``; checkpoints and prepared token files record the tokenizer's ``name``.
A folder written by ``llm tokenizer train`` (``tokenizer.tiktoken`` + ``tokenizer_config.json``)
loads as a :class:`~llm.bpe.BPETokenizer`, run by tiktoken.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

if TYPE_CHECKING:
    from .bpe import BPETokenizer
    from .hf_tokenizer import HFTokenizer

EOT_TOKEN = 50256
"""Id of ``<|endoftext|>``, the last entry of GPT-2's vocabulary."""

EOT_TEXT = "<|endoftext|>"

GPT2_VOCAB_FILES = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
"""The files tiktoken fetches for the ``gpt2`` encoding.  In its cache each one is stored under
the sha1 of its URL (see :func:`tiktoken_cache_files`)."""

DOWNLOAD_TIMEOUT_S = 60.0
"""How long we wait for tiktoken to download the vocabulary before giving up.

tiktoken calls ``requests.get`` without a timeout, so behind a firewall that silently drops
packets it would wait forever; we run it in a helper thread and stop waiting after this long.
"""


class Tokenizer:
    """GPT-2 BPE: text <-> list of token ids in ``[0, 50257)``.

    Construct it with :func:`get_tokenizer`, which caches the (slow to build) tiktoken encoding.
    """

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._enc = encoding
        self.name: str = encoding.name
        self.n_vocab: int = encoding.n_vocab
        self.eot_token: int = encoding.eot_token
        self.eos_token_id: int | None = encoding.eot_token  # HFTokenizer's name for it (None there if it has none)
        self.sha256: str | None = None  # "gpt2" names one fixed vocabulary; a tokenizer.json is known by its hash

    @property
    def vocab_size(self) -> int:
        """Ids are in ``[0, vocab_size)``: a model needs at least this many embedding rows."""
        return self.n_vocab

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        With ``allow_special`` (the default) a literal ``"<|endoftext|>"`` becomes token 50256;
        without it, it is encoded as ordinary characters (safer for text you do not control).
        """
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], *, allow_special: bool = True, num_threads: int = 8
    ) -> list[list[int]]:
        """:meth:`encode` for many texts at once, spread over tiktoken's thread pool."""
        if allow_special:
            return self._enc.encode_batch(
                list(texts), num_threads=num_threads, allowed_special="all"
            )
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a 1-D sequence of token ids (a list, a NumPy array or a 1-D tensor)."""
        return self._enc.decode(as_id_list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab})"


def as_id_list(ids: Iterable[int]) -> list[int]:
    """A 1-D sequence of ids (list, NumPy array, 1-D tensor) as a list of ints."""
    if hasattr(ids, "tolist"):  # torch.Tensor and np.ndarray
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    return list(ids)


GPT2 = "gpt2"
TOKENIZER_HELP = ("'gpt2' (tiktoken's GPT-2 BPE), a folder written by `llm tokenizer train`, or the path of a "
                  "Hugging Face tokenizer.json, or of a folder holding one (e.g. a Llama 3 or Qwen3 model folder)")
"""What ``--tokenizer`` accepts, for the commands' help texts."""


def get_tokenizer(name_or_path: str | os.PathLike = GPT2) -> Tokenizer | HFTokenizer | BPETokenizer:
    """The tokenizer ``name_or_path`` names: ``"gpt2"`` (the default) is tiktoken's GPT-2 BPE; a folder
    with a ``tokenizer.tiktoken`` is one that ``llm tokenizer train`` wrote; anything else is a
    ``tokenizer.json`` or a folder holding one (FileNotFoundError naming the path if not).

    Each is built once per process and shared (a failed attempt is not cached); a tokenizer folder
    or file is loaded again when it or its ``tokenizer_config.json`` changes on disk.
    """
    if os.fspath(name_or_path) == GPT2:
        return _cached_tokenizer(GPT2)
    from .bpe import is_bpe_folder

    if is_bpe_folder(name_or_path):
        from .bpe import CONFIG_FILE as BPE_CONFIG, RANKS_FILE

        folder = Path(name_or_path).expanduser().resolve()
        folder = folder.parent if folder.name == RANKS_FILE else folder
        return _cached_bpe_tokenizer(str(folder), _stamp(folder / RANKS_FILE, folder / BPE_CONFIG))
    from .hf_tokenizer import CONFIG_FILE, resolve_tokenizer_file

    file = resolve_tokenizer_file(name_or_path)
    return _cached_hf_tokenizer(str(file), _stamp(file, file.parent / CONFIG_FILE))


def _stamp(*paths: Path) -> tuple:
    """The files' mtimes and sizes (None for a missing one): part of a cache key, so an edited file misses it."""
    return tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None for p in paths)


def folder_tokenizer(folder: str | os.PathLike) -> str:
    """The tokenizer of a Hugging Face model folder: its tokenizer.json if it has one, else "gpt2"
    (a folder of weights alone, such as ``GPT.save_pretrained`` writes, is GPT-2's)."""
    return os.fspath(folder) if (Path(folder) / "tokenizer.json").is_file() else GPT2


def checkpoint_tokenizer(ckpt: dict) -> str:
    """The tokenizer a checkpoint's model was trained with ("gpt2" for one that does not say: the
    checkpoints written before tokenizers were recorded all used GPT-2's)."""
    return ckpt.get("tokenizer") or GPT2


def check_vocab_fits(vocab_size: int, tokenizer, what: str = "the model") -> None:
    """ValueError when ``tokenizer`` makes ids a model with ``vocab_size`` embedding rows cannot look up."""
    if vocab_size < tokenizer.n_vocab:
        raise ValueError(f"{what} has vocab_size {vocab_size}, fewer than the {tokenizer.n_vocab} ids of tokenizer "
                         f"{tokenizer.name}: its embedding cannot look them up; use the tokenizer the model was "
                         "trained with (--tokenizer), or a model with a large enough vocabulary")


@functools.lru_cache(maxsize=8)
def _cached_hf_tokenizer(path: str, stamp: tuple) -> HFTokenizer:
    # ``stamp`` (the files' mtimes and sizes) is only part of the cache key: an edited file misses the cache.
    from .hf_tokenizer import HFTokenizer

    return HFTokenizer(path)


@functools.lru_cache(maxsize=8)
def _cached_bpe_tokenizer(folder: str, stamp: tuple) -> BPETokenizer:
    from .bpe import BPETokenizer

    return BPETokenizer(folder)


@functools.cache
def _cached_tokenizer(name: str) -> Tokenizer:
    return Tokenizer(_load_encoding(name))


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken looks for its files (same rules as ``tiktoken.load``); None = no caching."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def tiktoken_cache_files() -> dict[str, Path | None]:
    """File name (``vocab.bpe``, ``encoder.json``) -> the path tiktoken caches it under."""
    cache = tiktoken_cache_dir()
    return {
        name: (cache / hashlib.sha1(url.encode()).hexdigest()) if cache else None
        for name, url in GPT2_VOCAB_FILES.items()
    }


def _missing_vocab_message(name: str, reason: str) -> str:
    files = "\n".join(
        f"    {path}  <- {GPT2_VOCAB_FILES[fname]}" for fname, path in tiktoken_cache_files().items()
    )
    return (
        f"The GPT-2 vocabulary for tokenizer {name!r} could not be downloaded and was not found "
        f"in the tiktoken cache ({reason}).\n"
        f"Set TIKTOKEN_CACHE_DIR to a folder that holds GPT-2's vocab.bpe and encoder.json, "
        f"each saved under the sha1 of its URL:\n{files}\n"
        f"(or run once with internet access and TIKTOKEN_CACHE_DIR set, so tiktoken fills it)."
    )


def _load_encoding(name: str, timeout: float | None = None) -> tiktoken.Encoding:
    """``tiktoken.get_encoding(name)``, turning network trouble into a clear RuntimeError."""
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    cached = all(p is not None and p.is_file() for p in tiktoken_cache_files().values())
    if cached:
        # No network involved: call it directly so real errors keep their own traceback.
        return tiktoken.get_encoding(name)

    result: dict[str, object] = {}

    def load() -> None:
        try:
            result["encoding"] = tiktoken.get_encoding(name)
        except BaseException as e:  # handed to the caller's thread below
            result["error"] = e

    # A daemon thread so that a download stuck in a socket read cannot keep the process alive.
    worker = threading.Thread(target=load, name="tiktoken-download", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RuntimeError(_missing_vocab_message(name, f"download timed out after {timeout:g} s"))
    error = result.get("error")
    if isinstance(error, (OSError, ValueError, ImportError)):
        # requests' ConnectionError is an OSError; tiktoken raises ValueError on a bad checksum.
        reason = f"{type(error).__name__}: {error}"[:300]
        raise RuntimeError(_missing_vocab_message(name, reason)) from error
    if error is not None:
        raise error  # type: ignore[misc]
    return result["encoding"]  # type: ignore[return-value]
