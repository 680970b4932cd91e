"""Data: from a corpus on disk (or on the internet) to batches of token ids.

The pipeline, one module per step::

    corpora.py     named corpora: download, sha256 check, data_dir() / cache_dir()
    sources.py     "tinyshakespeare" | "a.txt" | "folder/" | "*.txt" | "hf:name" -> documents
    tokenfiles.py  documents -> train.bin / val.bin (uint16/uint32 token files, tokenized once, cached)
    loaders.py     token files -> (x, y) batches: the book's sliding windows or random windows
    shards.py      a corpus too big for memory -> fixed-size token shards (streamed, parallel), and their loader

Typical use::

    from llm.data import prepare, TokenLoader
    data = prepare("tinyshakespeare")                 # tokenizes on the first call only
    loader = TokenLoader(data.train_tokens(), batch_size=8, block_size=256)
    x, y = loader.next_batch()                        # (8, 256) int64 each, y = x shifted by one
"""

from .corpora import (
    CORPORA,
    DATASETS,
    Corpus,
    cache_dir,
    data_dir,
    fetch_corpus,
    fetch_dataset,
    get_corpus,
    sha256_file,
)
from .sources import Document, resolve_source
from .tokenfiles import Prepared, check_tokenizer, prepare, source_identity, split_for_tokenizer, token_dtype

# The loaders need torch; imported on first use, so that what needs no torch (the tokenizer worker
# processes of llm prepare --shards, which import this package) starts in a tenth of the time.
_LOADERS = ("SlidingWindowDataset", "TokenLoader", "as_token_array", "create_dataloader", "unigram_loss")


def __getattr__(name: str):
    if name in _LOADERS:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CORPORA",
    "Corpus",
    "DATASETS",
    "Document",
    "Prepared",
    "SlidingWindowDataset",
    "TokenLoader",
    "as_token_array",
    "cache_dir",
    "check_tokenizer",
    "create_dataloader",
    "data_dir",
    "fetch_corpus",
    "fetch_dataset",
    "get_corpus",
    "prepare",
    "resolve_source",
    "sha256_file",
    "source_identity",
    "split_for_tokenizer",
    "token_dtype",
    "unigram_loss",
]
