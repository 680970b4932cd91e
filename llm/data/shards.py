"""Web-scale corpora: tokenize a stream of documents, in parallel, into fixed-size token shards.

    llm prepare hf:HuggingFaceFW/fineweb-edu:sample-10BT --shards out/fineweb --shard-tokens 100000000
    llm prepare "data/*.parquet" --shards out/mine --num-proc 8 --max-tokens 50000000

What :func:`llm.data.prepare` does for a corpus that fits in memory, for one that does not (as llm.c's
and build-nanogpt's FineWeb scripts do): documents are read one at a time (jsonl / parquet / text
files, or a Hugging Face dataset in streaming mode), tokenized by ``--num-proc`` worker processes,
joined by ``<|endoftext|>`` and cut into shards of ``--shard-tokens`` tokens.  The first
``--val-shards`` shards are the validation split (``val_000000.bin``, ...), the rest training
(``train_000001.bin``, ...); a document may continue from one shard into the next.

A shard is a 1024-byte header of 256 int32 then the tokens, uint16 (uint32 for vocabularies over
65,536 ids).  The first three header values are llm.c's (magic, version, token count: 20240520, 1
for uint16; 20240801, 7 for uint32), so llm.c's loader reads our shards; then ours: a marker, the
vocabulary size, the end-of-text id and the first 16 bytes of the tokenizer's sha256 identity.

``shards.json`` lists the finished shards, each with where the next one starts (document index and
token offset in it), and is rewritten atomically after every shard: an interrupted prepare run again
keeps what it finished and continues at the exact next token (``resumable``); a finished one is
recognised and reused.  ``--max-tokens`` stops after that many tokens (a sample of a big corpus).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .sources import HF_PREFIX, HFSpec

MANIFEST, FORMAT = "shards.json", "llm-shards-v1"
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
LLMC_HEADER = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}
MARK = 0x6C6C6D31  # "llm1": the header also carries our fields (vocab size, eot id, tokenizer id)
DOCS_PER_TASK = 64  # documents per worker task: big enough to amortize the inter-process traffic


# ---------------------------------------------------------------------------------------------
# shard files


def write_shard(path: Path, tokens: np.ndarray, *, n_vocab: int, eot: int, tokenizer_id: str) -> None:
    """Write one shard atomically (temp file, fsync, rename)."""
    from ..train.checkpoint import atomic_write

    dtype = tokens.dtype
    if dtype not in LLMC_HEADER:
        raise ValueError(f"shard tokens must be uint16 or uint32, got {dtype}")
    if len(tokens) >= 2**31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, got {len(tokens)}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1] = LLMC_HEADER[dtype]
    header[2], header[3], header[4], header[5] = len(tokens), MARK, n_vocab, eot
    header[8:12] = np.frombuffer(bytes.fromhex(tokenizer_id)[:16], dtype=np.int32)
    atomic_write(path, lambda f: (f.write(header.tobytes()), f.write(tokens.tobytes())))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a shard (ValueError naming the file when it is not one, or is truncated)."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if raw.size < HEADER_INTS:
        raise ValueError(f"{path}: not a token shard (shorter than its {HEADER_BYTES}-byte header)")
    kinds = {v: k for k, v in LLMC_HEADER.items()}
    dtype = kinds.get((int(raw[0]), int(raw[1])))
    if dtype is None:
        raise ValueError(f"{path}: not a token shard (magic {raw[0]}, version {raw[1]})")
    n = int(raw[2])
    if path.stat().st_size != HEADER_BYTES + n * dtype.itemsize:
        raise ValueError(f"{path}: truncated or padded ({path.stat().st_size} bytes, its header says {n} tokens)")
    ours = int(raw[3]) == MARK
    return {"dtype": dtype, "tokens": n, "n_vocab": int(raw[4]) if ours else None,
            "eot": int(raw[5]) if ours else None, "tokenizer_id": raw[8:12].tobytes().hex() if ours else None}


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """A shard's tokens, memory-mapped (nothing is read until used)."""
    h = read_header(path)
    return np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["tokens"],))


# ---------------------------------------------------------------------------------------------
# documents, streamed


def iter_documents(source: str, text_field: str = "text", hf_split: str = "train",
                   hf_data_files: Any = None) -> Iterator[str]:
    """The texts of ``source`` one at a time: ``hf:<name>[:<config>]`` (streamed, never all in memory), or
    files -- a file, a folder (recursively) or a glob of ``.jsonl`` (one JSON object a line), ``.parquet``
    (a column) and text files (each one document) -- in sorted order."""
    if source.startswith(HF_PREFIX):
        yield from _hf_stream(HFSpec.parse(source, hf_split, text_field, hf_data_files))
        return
    from .sources import iter_jsonl, local_files

    for path in local_files(source, folder_suffixes=(".jsonl", ".parquet", ".txt")):
        if path.suffix == ".jsonl":
            for i, row in iter_jsonl(path):
                if text_field not in row:
                    raise ValueError(f"{path}, line {i}: no field {text_field!r} (has {sorted(row)[:8]})")
                yield row[text_field] or ""
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                yield from (t or "" for t in batch.column(0).to_pylist())
        else:
            yield path.read_text(encoding="utf-8")


def _hf_stream(spec: HFSpec) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{HF_PREFIX}{spec.name} needs the Hugging Face 'datasets' package: pip install datasets") from e
    ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, data_files=spec.data_files, streaming=True)
    for row in ds:
        if spec.text_field not in row:
            raise ValueError(f"{HF_PREFIX}{spec.name} rows have no field {spec.text_field!r} (fields: {sorted(row)})")
        yield row[spec.text_field] or ""


# ---------------------------------------------------------------------------------------------
# tokenizing in worker processes

_worker_tokenizer = None


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    from ..tokenizer import get_tokenizer

    _worker_tokenizer = get_tokenizer(tokenizer_name)


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    # uint32 (every vocabulary fits) halves what goes back through the pipe against int64
    return [encode_document(_worker_tokenizer, t).astype(np.uint32) for t in texts]


def encode_document(tokenizer, text: str) -> np.ndarray:
    """One document's ids (int64); a long one is cut where tokenization cannot change (llm/data/tokenfiles.py)."""
    from .tokenfiles import _CUT, _NEWLINE_CUT, PIECE_CHARS, split_for_tokenizer

    cut = _CUT if getattr(tokenizer, "sha256", None) is None else _NEWLINE_CUT
    pieces = split_for_tokenizer([text], PIECE_CHARS, cut) if len(text) > PIECE_CHARS else [text]
    ids: list[int] = []
    for piece in pieces:
        ids.extend(tokenizer.encode(piece))
    return np.asarray(ids, dtype=np.int64)


def _chunks(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# the writer


@dataclass
class ShardSet:
    """A finished (or partly written) shard folder, as its ``shards.json`` describes it."""

    folder: Path
    meta: dict

    @property
    def train_paths(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.meta["shards"] if s["split"] == "train"]

    @property
    def val_paths(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.meta["shards"] if s["split"] == "val"]

    @property
    def n_tokens(self) -> int:
        return sum(s["tokens"] for s in self.meta["shards"])


def is_shard_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_shards(folder: str | os.PathLike, tokenizer=None) -> ShardSet:
    """A shard folder; ValueError when it is unfinished, damaged, or made by another tokenizer."""
    from .tokenfiles import check_tokenizer

    folder = Path(folder)
    meta = json.loads((folder / MANIFEST).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: not a shard manifest of this package (format {FORMAT!r})")
    if not meta.get("complete"):
        raise ValueError(f"{folder} is not finished: run the same `llm prepare ... --shards {folder}` again to complete it")
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, str(folder))
    for s in meta["shards"]:
        h = read_header(folder / s["name"])
        if h["tokens"] != s["tokens"]:
            raise ValueError(f"{folder / s['name']}: {h['tokens']} tokens, {MANIFEST} says {s['tokens']}")
    return ShardSet(folder, meta)


def prepare_shards(source: str, out: str | os.PathLike, tokenizer, *, shard_tokens: int = 100_000_000,
                   val_shards: int = 1, max_tokens: int | None = None, num_proc: int | None = None,
                   text_field: str = "text", hf_data_files: Any = None, progress: bool = True) -> ShardSet:
    """Tokenize ``source`` into shards in ``out`` (see the module docstring); returns the finished set.

    Run again on an unfinished folder, it keeps the shards its manifest lists and continues after them;
    a folder holding another source's, tokenizer's or shard size's shards is refused, naming the setting.
    """
    from .tokenfiles import token_dtype, tokenizer_identity

    if shard_tokens < 1 or val_shards < 0 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"need shard_tokens >= 1, val_shards >= 0, max_tokens >= 1; got {shard_tokens}, "
                         f"{val_shards}, {max_tokens}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = tokenizer_identity(tokenizer)
    tok_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    settings = {"source": source, "text_field": text_field, "tokenizer_id": tok_id, "shard_tokens": shard_tokens,
                "val_shards": val_shards, "max_tokens": max_tokens,
                "hf_data_files": None if hf_data_files is None else str(hf_data_files)}
    meta = {"format": FORMAT, **settings, "tokenizer": tokenizer.name, "eot_token": tokenizer.eot_token,
            **identity, "dtype": token_dtype(tokenizer.n_vocab).name, "shards": [], "complete": False,
            "next_doc": 0, "next_offset": 0}  # the identity's keys flat, as meta.json has them (check_tokenizer)
    manifest = out / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        for key, value in settings.items():
            if old.get(key) != value:
                raise ValueError(f"{out} holds shards made with {key}={old.get(key)!r}, this run asks for {value!r}: "
                                 "use another folder (or delete this one)")
        meta = old
        if meta["complete"]:
            return load_shards(out, tokenizer)
    _remove_unlisted(out, meta)
    writer = _ShardWriter(out, meta, tokenizer, tok_id)
    budget = None if max_tokens is None else max_tokens - writer.written
    first_doc, skip = meta["next_doc"], meta["next_offset"]
    bar = tqdm(total=max_tokens, initial=writer.written, unit="tok", unit_scale=True, desc=f"prepare {source}",
               disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    docs = _numbered(iter_documents(source, text_field, hf_data_files=hf_data_files), first_doc)
    pool = None
    if (num_proc or 1) > 1:
        ctx = multiprocessing.get_context("spawn")  # the same on Linux, macOS and Windows; no forked torch state
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.name,))
        encoded = _parallel(pool, docs, in_flight=4 * num_proc)
    else:
        encoded = ((i, encode_document(tokenizer, t)) for i, t in docs)
    try:
        for doc, ids in encoded:
            if budget == 0:
                break
            if not len(ids):
                continue  # an empty document adds nothing, not even a separator
            ids = ids.astype(np.int64)
            ids = np.concatenate([[tokenizer.eot_token], ids]) if doc > 0 else ids  # eot between documents
            offset = 0
            if doc == first_doc and skip:
                ids, offset = ids[skip:], skip  # already in the shards of an interrupted run
            if budget is not None:
                ids = ids[:budget]
                budget -= len(ids)
            writer.add(doc, offset, ids)
            bar.update(len(ids))
        writer.finish()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    meta["seconds_last_run"] = round(time.perf_counter() - t0, 3)
    _write_manifest(manifest, meta)
    return load_shards(out, tokenizer)


class _ShardWriter:
    """Collects (document, offset, ids) segments and writes a shard whenever ``shard_tokens`` are there;
    after each shard the manifest records where the next one starts: (document, token offset in it)."""

    def __init__(self, out: Path, meta: dict, tokenizer, tok_id: str):
        self.out, self.meta, self.tokenizer, self.tok_id = out, meta, tokenizer, tok_id
        self.dtype, self.size = np.dtype(meta["dtype"]), meta["shard_tokens"]
        self.segments: deque[list] = deque()  # [doc, offset of ids[0] in the document, ids]
        self.have, self.last_doc = 0, meta["next_doc"] - 1
        self.written = sum(s["tokens"] for s in meta["shards"])

    def add(self, doc: int, offset: int, ids: np.ndarray) -> None:
        if len(ids):
            self.segments.append([doc, offset, ids])
            self.have += len(ids)
        self.last_doc = doc
        while self.have >= self.size:
            self._write(self.size)

    def finish(self) -> None:
        if self.have:
            self._write(self.have)
        self.meta["complete"] = True

    def _write(self, n: int) -> None:
        parts, left = [], n
        while left:
            seg = self.segments[0]
            take = min(left, len(seg[2]))
            parts.append(seg[2][:take])
            seg[1], seg[2], left = seg[1] + take, seg[2][take:], left - take
            if not len(seg[2]):
                self.segments.popleft()
        tokens = np.concatenate(parts)
        if tokens.max(initial=0) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {tokens.max()} does not fit in {self.dtype.name}")
        index = len(self.meta["shards"])
        split = "val" if index < self.meta["val_shards"] else "train"
        name = f"{split}_{index:06d}.bin"
        write_shard(self.out / name, tokens.astype(self.dtype), n_vocab=self.tokenizer.n_vocab,
                    eot=self.tokenizer.eot_token, tokenizer_id=self.tok_id)
        self.have -= n
        self.written += n
        nxt = (self.segments[0][0], self.segments[0][1]) if self.segments else (self.last_doc + 1, 0)
        self.meta["shards"].append({"name": name, "split": split, "tokens": int(n)})
        self.meta["next_doc"], self.meta["next_offset"] = nxt
        _write_manifest(self.out / MANIFEST, self.meta)


def _numbered(texts: Iterator[str], first: int) -> Iterator[tuple[int, str]]:
    """(index, text) from document ``first`` on; the ones before are read and dropped, not tokenized."""
    for i, text in enumerate(texts):
        if i >= first:
            yield i, text


def _parallel(pool, docs: Iterator[tuple[int, str]], in_flight: int) -> Iterator[tuple[int, np.ndarray]]:
    """Documents tokenized by the pool in order, at most ``in_flight`` tasks ahead (``Pool.imap`` would
    read the whole input ahead into memory)."""
    pending: deque = deque()
    for batch in _chunks(docs, DOCS_PER_TASK):
        pending.append(([i for i, _ in batch], pool.apply_async(_encode_texts, ([t for _, t in batch],))))
        if len(pending) >= in_flight:
            indices, result = pending.popleft()
            yield from zip(indices, result.get())
    while pending:
        indices, result = pending.popleft()
        yield from zip(indices, result.get())


def _remove_unlisted(out: Path, meta: dict) -> None:
    """Shards an interrupted run wrote after its manifest's last entry (or their temp files) are redone."""
    listed = {s["name"] for s in meta["shards"]}
    for p in out.iterdir():
        if (p.suffix == ".bin" and p.name not in listed) or (p.name.startswith(".") and ".tmp-" in p.name):
            p.unlink()


def _write_manifest(path: Path, meta: dict) -> None:
    from ..train.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# the training loader


class ShardLoader:
    """(x, y) batches of ``block_size`` windows read in order through a list of shards.

    Each step's global batch is ``batch_size * block_size * world_size`` consecutive tokens (+1 for
    the targets) of the current shard; rank r takes the r-th slice of it, so the ranks read disjoint
    tokens.  A shard's tail too short for a whole global batch is skipped, then the next shard
    starts (after the last, the first again: an epoch).  ``state_dict`` (shard index, position) is
    all a resumed run needs to continue on the exact next token.
    """

    def __init__(self, paths: list[Path], batch_size: int, block_size: int, rank: int = 0, world_size: int = 1):
        if not paths:
            raise ValueError("ShardLoader needs at least one shard")
        self.paths, self.B, self.T = [Path(p) for p in paths], batch_size, block_size
        self.rank, self.world = rank, world_size
        need = batch_size * block_size * world_size + 1
        short = [p.name for p in self.paths if read_header(p)["tokens"] < need]
        if short:
            raise ValueError(f"shards {short[:3]} hold fewer than one global batch ({need} tokens): lower "
                             "--batch-size / --block-size or write bigger shards")
        self.shard, self.pos, self.epoch = 0, 0, 0
        self._tokens = open_shard(self.paths[0])

    @property
    def global_batch_size(self) -> int:
        return self.B * self.world

    def next_batch(self):
        import torch

        B, T, W = self.B, self.T, self.world
        start = self.pos + self.rank * B * T
        chunk = np.asarray(self._tokens[start:start + B * T + 1], dtype=np.int64)
        x = torch.from_numpy(chunk[:-1].copy()).view(B, T)
        y = torch.from_numpy(chunk[1:].copy()).view(B, T)
        self.pos += B * T * W
        if self.pos + B * T * W + 1 > len(self._tokens):  # the next global batch would not fit: next shard
            self._advance()
        return x, y

    def _advance(self) -> None:
        self.shard, self.pos = self.shard + 1, 0
        if self.shard == len(self.paths):
            self.shard, self.epoch = 0, self.epoch + 1
        self._tokens = open_shard(self.paths[self.shard])

    def state_dict(self) -> dict:
        return {"kind": "shards", "shard": self.shard, "pos": self.pos, "epoch": self.epoch,
                "shards": [p.name for p in self.paths], "world_size": self.world, "batch_size": self.B,
                "block_size": self.T}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards" or state["shards"] != [p.name for p in self.paths]:
            raise ValueError("the checkpoint's loader read other shards than this run's --data")
        if state["batch_size"] * state["world_size"] != self.B * self.world or state["block_size"] != self.T:
            raise ValueError("the global batch (batch_size x world size) and block_size must stay as the run began")
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]
        self._tokens = open_shard(self.paths[self.shard])
