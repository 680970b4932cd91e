"""Turning a source string into a list of documents.

A *source* is what the user types after ``--data``:

=============================  ===============================================================
``tinyshakespeare``            a named corpus from :data:`~llm.data.corpora.CORPORA`
``notes/book.txt``             one text file (any extension)
``notes/``                     every ``*.txt`` below a folder, recursively, in sorted order
``"notes/**/*.md"``            a glob (quote it so the shell does not expand it)
``hf:wikitext:wikitext-2-raw-v1``  a Hugging Face dataset ``hf:<name>[:<config>]``
=============================  ===============================================================

Each file, or each row of a Hugging Face dataset, is one *document*; :func:`~llm.data.prepare`
joins documents with ``<|endoftext|>`` so the model learns where one text ends and the next begins.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpora import CORPORA, fetch_corpus

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Document:
    """One document: either a file on disk (``path``) or text already in memory (``text``)."""

    name: str
    path: Path | None = None
    text: str | None = None

    @property
    def size(self) -> int:
        """Bytes of a file, characters of in-memory text (only used to size the progress bar)."""
        return self.path.stat().st_size if self.path is not None else len(self.text or "")


@dataclass(frozen=True)
class HFSpec:
    """The parts of an ``hf:<name>[:<config>]`` source plus the options for ``load_dataset``."""

    name: str
    config: str | None
    split: str = "train"
    text_field: str = "text"
    data_files: Any = None
    cache_dir: str | None = None

    @classmethod
    def parse(
        cls,
        source: str,
        hf_split: str = "train",
        hf_text_field: str = "text",
        hf_data_files: Any = None,
        hf_cache_dir: str | os.PathLike | None = None,
    ) -> HFSpec:
        name, _, config = source[len(HF_PREFIX) :].partition(":")
        if not name:
            raise ValueError(f"expected 'hf:<dataset_name>[:<config>]', got {source!r}")
        return cls(
            name=name,
            config=config or None,
            split=hf_split,
            text_field=hf_text_field,
            data_files=hf_data_files,
            cache_dir=os.fspath(hf_cache_dir) if hf_cache_dir is not None else None,
        )


def is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def resolve_source(
    source: str,
    *,
    hf_split: str = "train",
    hf_text_field: str = "text",
    hf_data_files: Any = None,
    hf_cache_dir: str | os.PathLike | None = None,
) -> list[Document]:
    """The documents of ``source`` (see the module docstring for the accepted forms).

    Raises ``FileNotFoundError`` for a path or glob that matches nothing, ``ValueError`` for a
    name that is neither a known corpus nor a path, and ``ImportError`` for ``hf:`` sources when
    the ``datasets`` package is missing.  Named corpora are downloaded (and verified) if needed.
    """
    if source.startswith(HF_PREFIX):
        spec = HFSpec.parse(source, hf_split, hf_text_field, hf_data_files, hf_cache_dir)
        return hf_documents(spec)
    if source in CORPORA:
        path = fetch_corpus(source)
        return [Document(name=source, path=path)]
    return [Document(name=str(p), path=p) for p in local_files(source)]


def local_files(source: str, folder_suffixes: tuple[str, ...] = (".txt",)) -> list[Path]:
    """The files a path, folder or glob stands for, sorted so the token order is reproducible; in a
    folder (recursively), those ending in one of ``folder_suffixes``."""
    expanded = os.path.expanduser(source)
    if is_glob(source):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"no files match the glob {source!r}")
        return [p.resolve() for p in files]
    path = Path(expanded)
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in folder_suffixes)
        if not files:
            raise FileNotFoundError(f"no {' or '.join('*' + s for s in folder_suffixes)} files in folder {source!r}")
        return [p.resolve() for p in files]
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such file or folder: {source!r}")
    known = ", ".join(sorted(CORPORA))
    raise ValueError(
        f"unknown data source {source!r}: not a known corpus ({known}), an existing file or "
        f"folder, a glob, or 'hf:<dataset_name>[:<config>]'"
    )


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each line of a JSON-lines file, read as it goes (gzipped when it ends in
    .gz); blank lines are skipped, and a line that is not a JSON object is a ValueError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}")
            yield n, record


def _looks_like_path(source: str) -> bool:
    return (
        os.sep in source
        or "/" in source
        or source.startswith((".", "~"))
        or Path(source).suffix != ""
    )


def hf_documents(spec: HFSpec) -> list[Document]:
    """Rows of a Hugging Face dataset split as documents (empty rows are kept; prepare skips them)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"loading {HF_PREFIX}{spec.name} needs the Hugging Face 'datasets' package: "
            "pip install datasets (or pip install -e .[hf])"
        ) from e
    ds = datasets.load_dataset(
        spec.name,
        spec.config,
        split=spec.split,
        data_files=spec.data_files,
        cache_dir=spec.cache_dir,
    )
    if spec.text_field not in ds.column_names:
        raise ValueError(
            f"{HF_PREFIX}{spec.name} has no column {spec.text_field!r} "
            f"(columns: {ds.column_names}); pass hf_text_field=..."
        )
    docs: list[Document] = []
    # Iterate in batches: row-by-row access to an Arrow table is much slower.
    for batch in ds.iter(batch_size=1000):
        for text in batch[spec.text_field]:
            docs.append(Document(name=f"{HF_PREFIX}{spec.name}[{len(docs)}]", text=text or ""))
    return docs
