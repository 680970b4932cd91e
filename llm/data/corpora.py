"""Named corpora: where they come from, where they live on disk, and how we know they are intact.

Raw downloads live in :func:`data_dir` (``$LLM_DATA_DIR``); everything we compute from them
(token files) lives in :func:`cache_dir` (``$LLM_CACHE_DIR``).  Keeping the two apart lets a
shared, read-only data folder serve many users or CI jobs, each with its own writable cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 30.0
"""Seconds urllib waits for the server to answer (per socket operation, not the whole file)."""


@dataclass(frozen=True)
class Corpus:
    """A text corpus we know how to download, pinned by the sha256 of its bytes."""

    name: str
    url: str
    sha256: str
    filename: str
    member: str | None = None
    """For a zip download: the archive member to extract (the sha256 is then that member's)."""


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        # Karpathy's char-rnn Shakespeare: 1.1 MB, 338,025 GPT-2 tokens, one document.
        Corpus(
            name="tinyshakespeare",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            filename="tinyshakespeare.txt",
        ),
        # Edith Wharton's short story that chapters 2-5 of the book train on: 20 kB, ~5k tokens.
        Corpus(
            name="the-verdict",
            url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            filename="the-verdict.txt",
        ),
    ]
}

# Files that are not pretraining text: instruction/preference data for SFT and DPO, and the
# downstream benchmarks.  Same pinning and download path as the corpora (fetch_dataset), but not
# valid as a pretraining ``--data`` source.
DATASETS: dict[str, Corpus] = {
    c.name: c
    for c in [
        # 1,100 Alpaca-style records {instruction, input, output} (the book's chapter 7).
        Corpus(
            name="instruction-data",
            url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            filename="instruction-data.json",
        ),
        # The same records plus a preferred ("chosen") and a dispreferred ("rejected") response.
        Corpus(
            name="instruction-data-with-preference",
            url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
            sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            filename="instruction-data-with-preference.json",
        ),
        # GSM8K test split: 1,319 {question, answer}; each answer ends with "#### <number>".
        Corpus(
            name="gsm8k",
            url="https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
            sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
            filename="gsm8k_test.jsonl",
        ),
        # HumanEval: 164 {task_id, prompt, entry_point, canonical_solution, test}, gzipped JSONL.
        Corpus(
            name="humaneval",
            url="https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz",
            sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
            filename="HumanEval.jsonl.gz",
        ),
        # UCI SMS Spam Collection: 5,574 "label<TAB>text" lines, 747 spam (the book's chapter 6).
        Corpus(
            name="sms-spam",
            url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            sha256="edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266",
            filename="SMSSpamCollection",
            member="SMSSpamCollection",
        ),
    ]
}


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llm-from-scratch"


def data_dir() -> Path:
    """Folder of raw corpus files: ``$LLM_DATA_DIR``, else ``~/.cache/llm-from-scratch/data``.

    May be read-only; we only ever write here to download a corpus that is missing.
    """
    env = os.environ.get("LLM_DATA_DIR")
    return Path(env).expanduser() if env else _user_cache_root() / "data"


def cache_dir() -> Path:
    """Writable folder for derived files: ``$LLM_CACHE_DIR``, else ``~/.cache/llm-from-scratch``."""
    env = os.environ.get("LLM_CACHE_DIR")
    return Path(env).expanduser() if env else _user_cache_root()


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so big files do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def get_corpus(name: str) -> Corpus:
    """The registry entry for ``name``; a ValueError listing the known names otherwise."""
    try:
        return CORPORA[name]
    except KeyError:
        known = ", ".join(sorted(CORPORA))
        raise ValueError(f"unknown corpus {name!r}; known corpora: {known}") from None


def fetch_dataset(name: str, *, timeout: float | None = None) -> Path:
    """Path of the verified local copy of dataset ``name`` (:data:`DATASETS`); see :func:`fetch_corpus`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return _fetch(DATASETS[name], timeout)


def fetch_corpus(name: str, *, timeout: float | None = None) -> Path:
    """Path of the verified local copy of corpus ``name``, downloading it first if missing.

    The file is ``data_dir() / corpus.filename``.  A present file is checked against the pinned
    sha256 and never overwritten (the data folder may be read-only): a mismatch is an error for
    the user to resolve.  A missing file is downloaded to a temporary file next to it, checked,
    then renamed into place, so an interrupted download never leaves a bad file behind.
    """
    return _fetch(get_corpus(name), timeout)


def _fetch(corpus: Corpus, timeout: float | None) -> Path:
    path = data_dir() / corpus.filename
    if path.is_file():
        actual = sha256_file(path)
        if actual != corpus.sha256:
            raise RuntimeError(
                _problem(corpus, path, f"checksum mismatch: sha256 is {actual}, expected {corpus.sha256}")
                + " Delete the file to download it again, or point LLM_DATA_DIR at a good copy."
            )
        return path
    try:
        _download(corpus, path, DOWNLOAD_TIMEOUT_S if timeout is None else timeout)
    except (OSError, ValueError) as e:  # URLError, timeouts and permission errors are OSErrors
        raise RuntimeError(
            _problem(corpus, path, f"download failed ({type(e).__name__}: {e})")
            + f" If this machine is offline, download {corpus.url} elsewhere and put it at"
            f" {path}, or set LLM_DATA_DIR to a folder that contains {corpus.filename}."
        ) from e
    return path


def _problem(corpus: Corpus, path: Path, what: str) -> str:
    return (
        f"corpus {corpus.name!r} ({corpus.url}): {what}. Expected file: {path} "
        f"(LLM_DATA_DIR={os.environ.get('LLM_DATA_DIR', '<unset>')})."
    )


def _download(corpus: Corpus, path: Path, timeout: float) -> None:
    """Stream ``corpus.url`` into ``path`` via a temp file, verifying the sha256 before renaming."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{corpus.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(corpus.url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if corpus.member is not None:
            h = _extract_member(tmp, corpus.member)
        if h.hexdigest() != corpus.sha256:
            raise ValueError(f"downloaded sha256 {h.hexdigest()} != expected {corpus.sha256}")
        os.replace(tmp, path)  # atomic: readers see either no file or the whole verified file
    finally:
        tmp.unlink(missing_ok=True)


def _extract_member(path: Path, member: str):
    """Replace the zip at ``path`` by its ``member``'s bytes; returns the sha256 of those bytes."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        data = zf.read(member)
    path.write_bytes(data)
    return hashlib.sha256(data)
