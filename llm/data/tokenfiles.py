"""Tokenize a source once into ``train.bin`` / ``val.bin``, and reuse the result ever after.

The token files are flat arrays of ``uint16`` (GPT-2's 50,257 ids fit in 16 bits), which halves
the disk space of int32 and lets :func:`numpy.memmap` serve any window of a corpus far larger than
RAM without reading the rest; a vocabulary of more than 65,536 ids (Llama 3's 128,256, Qwen3's
151,669) gets ``uint32`` (:func:`token_dtype`; meta.json says which).  Layout::

    cache_dir()/tokens/<slug>-<hash>/
        train.bin   uint16[n_train_tokens]   the first (1 - val_fraction) of the token stream
        val.bin     uint16[n_val_tokens]     its contiguous tail
        meta.json   source, counts, tokenizer, dtype, val_fraction, sha256 of the input bytes, ...

``<hash>`` covers everything the tokens depend on (the source's identity, the tokenizer and the
split), so changing any of them prepares a fresh folder instead of silently reusing a stale one.
A ``tokenizer.json`` is identified by the sha256 of its bytes (and its end-of-text id), not its path.
Such a folder can itself be the source of a later :func:`prepare` (``llm pretrain --data <folder>``):
it is used as it is, after checking that the tokenizer asked for is the one that made it.
The folder is built under a temporary name and renamed into place only when complete: a prepare
that is interrupted leaves nothing that a later run could mistake for a finished one.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from tqdm.auto import tqdm

from .corpora import CORPORA, cache_dir
from .sources import HF_PREFIX, Document, HFSpec, local_files, resolve_source

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16
"""The dtype of GPT-2's token files, and of any vocabulary up to 65,536 ids (see :func:`token_dtype`)."""
PIECE_CHARS = 1 << 18
"""Text is handed to the tokenizer in pieces of about this many characters, so a 10 GB file is
tokenized in bounded memory and the pieces can be spread over tiktoken's threads."""
PIECES_PER_BATCH = 8
"""Each call to ``encode_batch`` gets about this many pieces' worth of text (2 MiB), to keep its threads busy."""


THREADED_MIN_CHARS = 1 << 12
"""Pieces at least this long go through the tokenizer's thread pool, shorter ones one by one."""


class TokenizerLike(Protocol):
    """What :func:`prepare` needs from a tokenizer (``llm.tokenizer.Tokenizer`` and ``HFTokenizer`` have it;
    ``eot_token`` is read only when there are documents to separate, and an HFTokenizer also has
    ``sha256`` and ``eos_token_id``)."""

    name: str
    n_vocab: int
    eot_token: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``n_vocab``-id vocabulary: uint16 or uint32."""
    for dtype in (np.uint16, np.uint32):
        if n_vocab <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {n_vocab} ids does not fit in uint32")


def tokenizer_identity(tokenizer: TokenizerLike) -> dict[str, Any]:
    """What the token ids depend on: GPT-2's name, or a tokenizer.json's content and end-of-text id.

    For "gpt2" it is what it always was, so the token folders prepared before other tokenizers
    existed keep their hash and are reused.
    """
    sha = getattr(tokenizer, "sha256", None)
    if sha is None:
        return {"tokenizer": tokenizer.name, "n_vocab": tokenizer.n_vocab}
    return {"tokenizer_sha256": sha, "n_vocab": tokenizer.n_vocab, "eot_token": _eos_id(tokenizer)}


def _eos_id(tokenizer: TokenizerLike) -> int | None:
    """The end-of-text id, or None for a tokenizer.json without one (test doubles have only ``eot_token``)."""
    try:
        return tokenizer.eos_token_id
    except AttributeError:
        return tokenizer.eot_token


def check_tokenizer(meta: dict[str, Any], tokenizer: TokenizerLike, what: str) -> None:
    """ValueError when the tokens ``meta`` describes (a meta.json, a checkpoint's ``data_meta``) were
    not made by ``tokenizer``: their ids would mean other text, and training on them is silently wrong."""
    want = tokenizer_identity(tokenizer)
    made = {k: meta.get(k) for k in want}
    if "tokenizer_sha256" not in want:
        made["tokenizer_sha256"] = meta.get("tokenizer_sha256")  # GPT-2 must not match a tokenizer.json's files
        want["tokenizer_sha256"] = None
    if made == want:
        return
    short = lambda v: f"{v[:12]}..." if isinstance(v, str) and len(v) > 40 else repr(v)  # a sha256 is 64 digits
    differ = ", ".join(f"{k} {short(made[k])} there, {short(want[k])} now" for k in want if made[k] != want[k])
    raise ValueError(
        f"{what} was made by tokenizer {meta.get('tokenizer', 'gpt2')!r} ({meta.get('n_vocab')} ids), not by "
        f"{tokenizer.name!r} ({tokenizer.n_vocab} ids) that this run uses ({differ}); tokenize the data again "
        f"with --tokenizer {tokenizer.name}, or run with --tokenizer {meta.get('tokenizer', 'gpt2')}")


@dataclass(frozen=True)
class Prepared:
    """A prepared token folder.  ``train_tokens()`` / ``val_tokens()`` are 1-D read-only arrays of
    :attr:`dtype` (uint16, or uint32 for a vocabulary over 65,536 ids)."""

    dir: Path
    meta: dict[str, Any]

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta.get("dtype", "uint16"))  # meta.json has always said; uint16 was the only one

    def train_tokens(self) -> np.ndarray:
        """Shape ``(n_train_tokens,)``, dtype :attr:`dtype`, memory-mapped read-only."""
        return _open_tokens(self.train_path, self.dtype)

    def val_tokens(self) -> np.ndarray:
        """Shape ``(n_val_tokens,)``, dtype :attr:`dtype`, memory-mapped read-only (empty if no val)."""
        return _open_tokens(self.val_path, self.dtype)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Prepared:
        """Open a folder that :func:`prepare` wrote earlier."""
        path = Path(path)
        return cls(dir=path, meta=json.loads((path / "meta.json").read_text()))


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def prepared_folder(source: str | os.PathLike) -> Path | None:
    """``source`` as a folder that :func:`prepare` wrote (meta.json, train.bin, val.bin), else None."""
    path = Path(source).expanduser()
    if path.is_dir() and all((path / n).is_file() for n in ("meta.json", "train.bin", "val.bin")):
        return path
    return None


def open_prepared(folder: str | os.PathLike, tokenizer: TokenizerLike) -> Prepared:
    """A finished prepared folder, checked to be complete and made by ``tokenizer`` (ValueError if not)."""
    folder = Path(folder)
    if not _is_complete(folder):
        raise ValueError(f"{folder} is not a complete prepared token folder (its meta.json does not match its "
                         "train.bin/val.bin): prepare its source again")
    prepared = Prepared.from_dir(folder)
    check_tokenizer(prepared.meta, tokenizer, f"the token folder {folder}")
    return prepared


def prepare(
    source: str,
    *,
    val_fraction: float = 0.1,
    tokenizer: TokenizerLike | None = None,
    progress: bool = True,
    force: bool = False,
    **hf_kwargs: Any,
) -> Prepared:
    """Tokenize ``source`` (see :func:`~llm.data.resolve_source`) into train/val token files.

    Documents are joined with ``<|endoftext|>`` into one token stream; the last ``val_fraction``
    of that stream becomes ``val.bin`` and the rest ``train.bin``.  A second call with the same
    arguments returns the existing files without tokenizing again (``force=True`` redoes it).
    ``hf_kwargs`` (``hf_split``, ``hf_text_field``, ``hf_data_files``, ``hf_cache_dir``) are passed
    on for ``hf:`` sources.  ``tokenizer`` defaults to GPT-2's.

    ``source`` may also be a folder that an earlier prepare wrote: it is returned as it is, after
    checking that ``tokenizer`` made it and that it was split with this ``val_fraction`` (ValueError).

    With several processes (DDP), call this on rank 0 first and barrier, so that the others find
    the finished folder instead of each tokenizing the corpus again.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unknown = set(hf_kwargs) - {"hf_split", "hf_text_field", "hf_data_files", "hf_cache_dir"}
    if unknown:
        raise TypeError(f"prepare() got unexpected keyword arguments {sorted(unknown)}")
    if tokenizer is None:
        from ..tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    dtype = token_dtype(tokenizer.n_vocab)
    folder = prepared_folder(source)
    if folder is not None:
        prepared = open_prepared(folder, tokenizer)
        made = prepared.meta.get("val_fraction")
        if made != val_fraction:
            raise ValueError(f"the token folder {folder} was split with val_fraction={made}, not {val_fraction}: "
                             f"pass --val-fraction {made}, or prepare its source again with the split you want")
        return prepared

    identity = source_identity(source, **hf_kwargs)
    key = {
        "format": FORMAT_VERSION,
        "source": identity,
        **tokenizer_identity(tokenizer),
        "val_fraction": val_fraction,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    final = cache_dir() / "tokens" / f"{_slug(source)}-{digest[:12]}"
    if not force and _is_complete(final):
        return Prepared.from_dir(final)

    replace = force or final.exists()  # an existing folder here is damaged or to be redone
    docs = resolve_source(source, **hf_kwargs)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    try:
        meta = _tokenize_and_split(source, docs, tokenizer, val_fraction, tmp, progress, dtype)
        meta["key"] = key
        _write_json(tmp / "meta.json", meta)
        for name in ("train.bin", "val.bin", "meta.json"):
            _fsync(tmp / name)  # on disk before the rename publishes them, even if power fails
        _publish(tmp, final, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared.from_dir(final)


def source_identity(source: str, **hf_kwargs: Any) -> dict[str, Any]:
    """What the tokens of ``source`` depend on, computed without reading or tokenizing it.

    Corpora are pinned by their sha256; local files by path, size and modification time (so an
    edited file is prepared again); Hugging Face datasets by name, config, split and options.
    """
    if source.startswith(HF_PREFIX):
        spec = HFSpec.parse(source, **hf_kwargs)
        return {
            "kind": "hf",
            "name": spec.name,
            "config": spec.config,
            "split": spec.split,
            "text_field": spec.text_field,
            "data_files": _with_file_stats(spec.data_files),
        }
    if source in CORPORA:
        return {"kind": "corpus", "name": source, "sha256": CORPORA[source].sha256}
    return {"kind": "files", "files": [_file_stat(p) for p in local_files(source)]}


def _file_stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _with_file_stats(data_files: Any) -> Any:
    """``data_files`` with every existing local path replaced by its path, size and mtime."""
    if isinstance(data_files, (str, os.PathLike)):
        path = Path(data_files).expanduser()
        return _file_stat(path.resolve()) if path.is_file() else os.fspath(data_files)
    if isinstance(data_files, dict):
        return {k: _with_file_stats(v) for k, v in sorted(data_files.items())}
    if isinstance(data_files, (list, tuple)):
        return [_with_file_stats(v) for v in data_files]
    return data_files


def _slug(source: str) -> str:
    """A readable folder-name prefix such as ``tinyshakespeare`` or ``hf-wikitext``."""
    if source.startswith(HF_PREFIX):
        text = "hf-" + source[len(HF_PREFIX) :]
    elif source in CORPORA:
        text = source
    else:
        text = Path(source.rstrip("/\\*?")).stem or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:40] or "data"


def _is_complete(folder: Path) -> bool:
    """True if ``folder`` holds a finished prepare whose files have the sizes meta.json promises."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
        return (
            meta.get("format") == FORMAT_VERSION
            and (folder / "train.bin").stat().st_size == meta["n_train_tokens"] * itemsize
            and (folder / "val.bin").stat().st_size == meta["n_val_tokens"] * itemsize
        )
    except (OSError, ValueError, KeyError):
        return False


def _publish(tmp: Path, final: Path, *, replace: bool) -> None:
    """Move the finished ``tmp`` folder to ``final`` with renames, so readers never see it half done."""
    if final.exists():
        if not replace:
            return  # another process finished the same prepare first; theirs is as good as ours
        old = final.with_name(f".{final.name}.tmp-{os.getpid()}-old{time.time_ns()}")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final):  # lost a race with another process: keep its result
            raise


_WORK_FOLDER = re.compile(r"^\..+\.tmp-(\d+)-")


def remove_stale_folders(tokens_dir: Path) -> list[Path]:
    """Delete the work folders (``.<name>.tmp-<pid>-*``) of prepares that were killed mid-way: a
    folder whose pid is no longer alive is a leftover (a live one may be another prepare, running)."""
    from ..train.checkpoint import _pid_alive

    removed = []
    for folder in tokens_dir.glob(".*.tmp-*"):
        m = _WORK_FOLDER.match(folder.name)
        if m and folder.is_dir() and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Tokenizing


def _tokenize_and_split(
    source: str,
    docs: list[Document],
    tokenizer: TokenizerLike,
    val_fraction: float,
    out_dir: Path,
    progress: bool,
    dtype: np.dtype,
) -> dict[str, Any]:
    """Write ``train.bin`` and ``val.bin`` (of ``dtype``) into ``out_dir``; return their meta data."""
    all_path = out_dir / "all.bin"
    total = sum(doc.size for doc in docs)
    with (
        open(all_path, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {source}", disable=not progress) as bar,
    ):
        writer = _TokenWriter(out, tokenizer, dtype)
        writer.write_documents(docs, bar.update)

    n = writer.n_tokens
    if n == 0:
        raise ValueError(f"source {source!r} contains no text")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = max(n_val, 1)
    n_train = n - n_val
    _split_tail(all_path, n_train, out_dir / "train.bin", out_dir / "val.bin", dtype.itemsize)

    file_docs = [doc.name for doc in docs if doc.path is not None]
    return {
        "format": FORMAT_VERSION,
        "source": source,
        "inputs": file_docs[:1000],  # a reminder of what went in, not an exhaustive list
        "n_docs": writer.n_docs,
        "sha256": writer.sha256.hexdigest(),  # of the input bytes, in order
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "dtype": dtype.name,
        **tokenizer_identity(tokenizer),
        "tokenizer": tokenizer.name,  # for people: a tokenizer.json's path (its sha256 is what is checked)
        "eot_token": _eos_id(tokenizer),
        "val_fraction": val_fraction,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _split_tail(all_path: Path, n_train: int, train_path: Path, val_path: Path, itemsize: int) -> None:
    """Copy the tokens after ``n_train`` to ``val_path``, then cut them off ``all_path``.

    Truncating in place instead of copying the (much larger) train part saves a pass over the disk.
    """
    with open(all_path, "rb") as src, open(val_path, "wb") as dst:
        src.seek(n_train * itemsize)
        shutil.copyfileobj(src, dst)
    os.truncate(all_path, n_train * itemsize)
    os.rename(all_path, train_path)


class _TokenWriter:
    """Streams documents through the tokenizer into a file of ``dtype``, ``<|endoftext|>`` between them."""

    def __init__(self, out: BinaryIO, tokenizer: TokenizerLike, dtype: np.dtype = np.dtype(TOKEN_DTYPE)) -> None:
        self.out = out
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        # GPT-2's pre-tokenizer allows a cut before a space; other tokenizers' only after a newline (see _CUT).
        self.cut = _CUT if getattr(tokenizer, "sha256", None) is None else _NEWLINE_CUT
        self.sha256 = hashlib.sha256()
        self.n_tokens = 0
        self.n_docs = 0
        self._last_doc = -1
        self._batch: list[tuple[int, str]] = []  # (document index, text piece)
        self._batch_chars = 0

    def write_documents(self, docs: Iterable[Document], on_progress: Callable[[int], None]) -> None:
        for i, doc in enumerate(docs):
            blocks = _read_text(doc, self.sha256, on_progress, PIECE_CHARS)
            for piece in split_for_tokenizer(blocks, PIECE_CHARS, self.cut):
                self._batch.append((i, piece))
                self._batch_chars += len(piece)
                # Batch by size, not count: a dataset of short rows would otherwise pay
                # the thread pool's overhead for every handful of sentences.
                if self._batch_chars >= PIECES_PER_BATCH * PIECE_CHARS or len(self._batch) >= 10_000:
                    self._flush()
        self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        all_ids = self._encode([piece for _, piece in self._batch])
        out: list[int] = []
        for (doc, _), ids in zip(self._batch, all_ids, strict=True):
            if doc != self._last_doc:
                if self._last_doc >= 0:
                    out.append(self.tokenizer.eot_token)
                self._last_doc = doc
                self.n_docs += 1
            out.extend(ids)
        self._write(out)
        self._batch.clear()
        self._batch_chars = 0

    def _encode(self, pieces: list[str]) -> list[list[int]]:
        # tiktoken's thread pool costs tens of microseconds per text: worth it for long pieces,
        # ten times slower than a plain call for the one-sentence rows of many HF datasets.
        long = [i for i, piece in enumerate(pieces) if len(piece) >= THREADED_MIN_CHARS]
        encoded = dict(zip(long, self.tokenizer.encode_batch([pieces[i] for i in long]), strict=True)) if long else {}
        return [encoded[i] if i in encoded else self.tokenizer.encode(p) for i, p in enumerate(pieces)]

    def _write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.max() > np.iinfo(self.dtype).max or arr.min() < 0):
            raise ValueError(f"token id {arr.max()} does not fit in {self.dtype.name}")
        self.out.write(arr.astype(self.dtype).tobytes())
        self.n_tokens += arr.size


def _read_text(
    doc: Document, sha256: Any, on_progress: Callable[[int], None], block_bytes: int
) -> Iterator[str]:
    """The text of ``doc`` in blocks; also feeds its raw bytes to ``sha256`` and the progress bar."""
    if doc.path is None:
        text = doc.text or ""
        sha256.update(text.encode("utf-8"))
        yield text
        on_progress(len(text))
        return
    # An incremental decoder, because a block boundary may fall inside a multi-byte character.
    # Reading bytes (rather than text mode) also keeps "\r\n" as is and lets us hash the file.
    decoder = codecs.getincrementaldecoder("utf-8")()

    def decode(raw: bytes, final: bool = False) -> str:
        try:
            return decoder.decode(raw, final)
        except UnicodeDecodeError as e:
            raise ValueError(f"{doc.path} is not valid UTF-8 text: {e}") from e

    with open(doc.path, "rb") as f:
        while raw := f.read(block_bytes):
            sha256.update(raw)
            yield decode(raw)
            on_progress(len(raw))
    yield decode(b"", final=True)


# The whitespace of the Rust regex crate (Unicode White_Space), which tiktoken's pattern uses.
# Python's str.isspace() also counts a few control characters, so we spell the set out.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A safe place to cut: just before a newline or space that is followed by a non-space character
# (not "<", which could start "<|endoftext|>").  GPT-2's pre-tokenizer always ends a token
# there and starts the next one with that character, so tokenizing the two sides separately
# gives exactly the tokens of the whole; `test_split_for_tokenizer_is_exact` checks this.
_CUT = re.compile(f"[\n ](?=[^{_WS}<])")
# For other tokenizers, just after a newline that is followed by a non-space character.  The
# pre-tokenizer regexes of Llama 3 and Qwen (and GPT-2's) all end a token there: a newline joins
# the whitespace and punctuation before it, never the text after it.  A cut before a space is not
# safe for them (Llama 3 makes " \n" one token).  Tokenizers without such a regex (SentencePiece's
# Metaspace prepends U+2581 to every call's text) may differ at a cut: one token per piece, at most.
_NEWLINE_CUT = re.compile(f"(?<=\n)(?=[^{_WS}<])")
_CUT_SEARCH_CHARS = 1 << 16


def split_for_tokenizer(
    blocks: Iterable[str], piece_chars: int = PIECE_CHARS, cut_at: re.Pattern = _CUT
) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of about ``piece_chars`` characters that
    tokenize exactly like the concatenated text (no token straddles two pieces).

    ``cut_at`` matches where a cut is safe: GPT-2's (the default) or ``_NEWLINE_CUT`` for other tokenizers.
    Empty pieces are never yielded; a text without any safe cut (no spaces at all) stays whole.
    """
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) > piece_chars:
            cut = _find_cut(buf, piece_chars, cut_at)
            if cut is None:
                break  # no safe cut in the text so far: read more
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _find_cut(text: str, target: int, cut_at: re.Pattern = _CUT) -> int | None:
    """The last safe cut in the ``_CUT_SEARCH_CHARS`` before ``target``, else the first after it."""
    cut = None
    # endpos=target+1 so that the look-ahead can see the character at ``target``.
    for m in cut_at.finditer(text, max(1, target - _CUT_SEARCH_CHARS), target + 1):
        cut = m.start()
    if cut is None and (m := cut_at.search(text, max(1, target))) is not None:
        cut = m.start()
    return cut
