"""Train a byte-level BPE tokenizer from scratch (the book's bonus chapter on BPE), saved in tiktoken's format.

    llm tokenizer train --data tinyshakespeare --vocab-size 4096 --out tok/shakespeare-4k
    llm prepare tinyshakespeare --tokenizer tok/shakespeare-4k

Training, the way GPT-2's vocabulary was made:

1. *Pre-tokenize*: GPT-2's regex (:data:`GPT2_PATTERN`) cuts the text into words (`` the``, ``'s``,
   ``  ``); merges never cross a word boundary, so a word's count is all that matters and the corpus
   becomes a table ``word bytes -> count``.
2. *Merge*: start from the 256 single bytes; repeatedly make the most frequent adjacent pair of tokens
   (summed over the table, weighted by count) a new token.  Ties go to the smallest pair of ids, so a
   run is reproducible.
3. *Specials*: ``<|endoftext|>`` (and any ``--special``) take the ids after the merges.

Recounting every pair after each merge costs a pass over the whole table per merge.  Instead
:func:`train_bpe` keeps the pair counts and, per pair, the set of words that contain it; a merge
rewrites only those words, subtracting their old pairs and adding their new ones, and a heap with
lazy deletion finds the next most frequent pair.  4,096 tokens on tinyshakespeare take seconds.

A tiktoken vocabulary maps token *bytes* to a rank (= id).  Its encoder merges, inside each word,
the adjacent pair whose concatenation has the lowest rank, until none is in the vocabulary.  Since
a merge's rank is its order of creation, that replays training.  Two different pairs can spell the
same bytes (``"ab"+"c"`` and ``"a"+"bc"``); such a later pair becomes the existing token instead of
a duplicate, so every id has distinct bytes.

:class:`PyBPE` is that encoder in plain Python (the book's version: readable, slow, cached per word);
the tests prove it gives exactly tiktoken's ids with GPT-2's own ranks.  At use time
:class:`BPETokenizer` hands the saved ranks to ``tiktoken.Encoding`` and runs at tiktoken's speed.

Saved as a folder: ``tokenizer.tiktoken`` (one ``base64(bytes) rank`` line per token, what
``tiktoken.load.load_tiktoken_bpe`` reads) and ``tokenizer_config.json`` (pattern, special tokens,
sizes, the ranks file's sha256).  ``get_tokenizer(folder)`` loads it anywhere ``--tokenizer`` is accepted.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex
import tiktoken
from tqdm.auto import tqdm

from .tokenizer import EOT_TEXT, Tokenizer, as_id_list

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
"""GPT-2's pre-tokenizer regex, as tiktoken spells it (possessive quantifiers; same splits as the original
``'s|'t|...| ?\\p{L}+|...|\\s+(?!\\S)|\\s+``)."""
RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
FORMAT = "llm-bpe"
FORMAT_VERSION = 1
N_BYTES = 256


# ---------------------------------------------------------------------------------------------- training


def count_words(texts: Iterable[str], special_tokens: Sequence[str] = (), pattern: str = GPT2_PATTERN) -> Counter:
    """``word bytes -> count`` over ``texts`` after pre-tokenization.  Special tokens written in the
    text are cut out first, so ``<|endoftext|>`` is never learned as ``<|``, ``endoftext``, ``|>``."""
    pat = regex.compile(pattern)
    special = _special_regex(special_tokens)
    counts: Counter = Counter()
    for text in texts:
        text = fix_surrogates(text)
        for part in special.split(text) if special else (text,):
            counts.update(pat.findall(part))
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def train_bpe(word_counts: dict[bytes, int], n_merges: int, *, progress: bool = False
              ) -> tuple[list[bytes], list[tuple[int, int]]]:
    """(vocab, merges): ``vocab[i]`` is the bytes of token i (256 single bytes, then one per merge),
    ``merges[k]`` the pair of ids that made token ``256 + k``.  ValueError if the words run out of
    pairs before ``n_merges`` merges."""
    vocab = [bytes([i]) for i in range(N_BYTES)]
    index = {b: i for i, b in enumerate(vocab)}
    words = [list(w) for w in word_counts]  # each word as a list of token ids, bytes to begin with
    counts = list(word_counts.values())
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of the words holding it
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_count[pair] += counts[w]
            where[pair].add(w)
    # Max-heap by (count desc, pair asc); an entry whose count is no longer the pair's is stale and skipped.
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    with tqdm(total=n_merges, desc="merges", unit="merge", disable=not progress) as bar:
        while len(merges) < n_merges:
            pair = _pop_best(heap, pair_count)
            if pair is None:
                raise ValueError(f"the training text has only {len(merges)} distinct merges, fewer than the "
                                 f"{n_merges} asked for: use a smaller --vocab-size or more text")
            merged = vocab[pair[0]] + vocab[pair[1]]
            new = index.get(merged)
            if new is None:  # (else: these bytes are already a token, made by another pair: reuse its id)
                new = index[merged] = len(vocab)
                vocab.append(merged)
                merges.append(pair)
                bar.update()
            changed = _apply_merge(pair, new, words, counts, pair_count, where)
            for q in changed:
                if pair_count[q] > 0:
                    heapq.heappush(heap, (-pair_count[q], q))
                else:
                    del pair_count[q], where[q]
    return vocab, merges


def _pop_best(heap: list, pair_count: dict) -> tuple[int, int] | None:
    while heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) == -neg:
            return pair
    return None


def _apply_merge(pair, new, words, counts, pair_count, where) -> set[tuple[int, int]]:
    """Rewrite every word holding ``pair`` with ``new`` in its place (left to right, as the encoder
    does) and update the counts of the pairs those words lose and gain; returns the pairs touched."""
    a, b = pair
    changed: set[tuple[int, int]] = set()
    for w in list(where[pair]):
        ids, c = words[w], counts[w]
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        old_pairs, new_pairs = list(zip(ids, ids[1:])), list(zip(out, out[1:]))
        for q in old_pairs:
            pair_count[q] -= c
        for q in new_pairs:
            pair_count[q] += c
            where[q].add(w)
        for q in set(old_pairs).difference(new_pairs):
            where[q].discard(w)
        changed.update(old_pairs, new_pairs)
        words[w] = out
    return changed


# ---------------------------------------------------------------------------------------------- encoding


def _special_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    # Longest first, so that a special token that begins another one cannot hide it.
    specials = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None


def fix_surrogates(text: str) -> str:
    """What tiktoken encodes for a ``str`` that is not valid Unicode: surrogate pairs joined into their
    character, lone surrogates replaced by U+FFFD (its ``encode`` does exactly this on UnicodeEncodeError)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def merge_parts(ranks: dict[bytes, int], piece: bytes, below: int | None = None) -> list[bytes]:
    """``piece``'s bytes after BPE: merge the leftmost adjacent pair of lowest rank (only ranks under
    ``below``, if given) until no adjacent pair is a token; the parts that remain."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (below is None or rank < below) and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best_rank is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


class PyBPE:
    """A tiktoken-style BPE encoder in plain Python: ``ranks`` (token bytes -> id) plus special tokens.

    Each pre-token is looked up whole first; otherwise its bytes are merged, one pair at a time, at
    the leftmost adjacent pair of lowest rank, until no adjacent pair is a token (tiktoken's
    ``byte_pair_merge``).  Results are cached per pre-token, which makes a 1 MB text take seconds.
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN) -> None:
        self.ranks = ranks
        self.special_tokens = dict(special_tokens or {})
        self.decoder = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in self.special_tokens.items()}
        self._pat = regex.compile(pattern)
        self._special = _special_regex(self.special_tokens)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        text = fix_surrogates(text)
        if not (allow_special and self._special):
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in self._special.finditer(text):
            ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in self._pat.findall(fix_surrogates(text)):
            if word not in cache:
                cache[word] = self.encode_word(word.encode("utf-8"))
            ids += cache[word]
        return ids

    def encode_word(self, piece: bytes) -> list[int]:
        if piece in self.ranks:
            return [self.ranks[piece]]
        return [self.ranks[p] for p in merge_parts(self.ranks, piece)]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.decoder[i] for i in as_id_list(ids)).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------- files


def save_bpe(folder: str | os.PathLike, vocab: Sequence[bytes], special_tokens: Sequence[str], *,
             pattern: str = GPT2_PATTERN, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``folder/tokenizer.tiktoken`` and ``folder/tokenizer_config.json``; returns the folder.

    FileExistsError for a folder that exists and is not empty unless ``overwrite`` (then only our two
    files are replaced).  Each file is written whole to a temporary name and renamed into place.
    """
    folder = check_out_folder(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    ranks_bytes = b"".join(base64.b64encode(tok) + b" %d\n" % rank for rank, tok in enumerate(vocab))
    specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pattern": pattern,
        "special_tokens": specials, "eos_token": _eos_text(specials), "vocab_size": len(vocab) + len(specials),
        "n_merges": len(vocab) - N_BYTES, "ranks_file": RANKS_FILE,
        "ranks_sha256": hashlib.sha256(ranks_bytes).hexdigest(), **(extra or {}),
    }
    _write_atomic(folder / RANKS_FILE, ranks_bytes)
    _write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
    return folder


def check_out_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """``folder`` as a Path; FileExistsError if it is a file, or a folder with something in it and not ``overwrite``."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {str(folder)!r} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"--out folder {str(folder)!r} exists and is not empty; pass --overwrite to replace "
                              "the tokenizer in it")
    return folder


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _eos_text(specials: dict[str, int]) -> str | None:
    return EOT_TEXT if EOT_TEXT in specials else next(iter(specials), None)


def is_bpe_folder(path: str | os.PathLike) -> bool:
    """True for a folder that :func:`save_bpe` wrote (or a path to its ``tokenizer.tiktoken``)."""
    p = Path(path).expanduser()
    return (p / RANKS_FILE).is_file() or (p.name == RANKS_FILE and p.is_file())


def load_bpe(path: str | os.PathLike) -> tuple[Path, dict, dict[bytes, int], bytes]:
    """(folder, config, ranks, raw ranks file) of a saved tokenizer, checked: ValueError when the
    config is missing or malformed, or the ranks file is not the one the config was written with."""
    folder = Path(path).expanduser().resolve()
    if folder.name == RANKS_FILE:
        folder = folder.parent
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} has {RANKS_FILE} but no {CONFIG_FILE}") from None
    except ValueError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a {FORMAT} tokenizer config (written by `llm tokenizer train`)")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}")
    raw = (folder / RANKS_FILE).read_bytes()
    if hashlib.sha256(raw).hexdigest() != config.get("ranks_sha256"):
        raise ValueError(f"{folder / RANKS_FILE} does not match the ranks_sha256 of {config_path}: it was changed "
                         "after training; train the tokenizer again")
    ranks = {}
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{folder / RANKS_FILE}, line {n}: not 'base64 rank' ({exc})") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < N_BYTES:
        raise ValueError(f"{folder / RANKS_FILE}: the ranks are not 0..n-1, one per distinct token")
    return folder, config, ranks, raw


class BPETokenizer(Tokenizer):
    """A tokenizer trained by ``llm tokenizer train``, run by tiktoken, with :class:`~llm.tokenizer.Tokenizer`'s API.

    ``name`` is the folder's absolute path (what checkpoints and token files record and what
    ``get_tokenizer`` loads again); ``sha256`` covers the ranks, the pattern and the special tokens,
    so token files made by another tokenizer, or by this folder before it was retrained, do not match.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        folder, config, ranks, raw = load_bpe(path)
        specials = {str(s): int(i) for s, i in config.get("special_tokens", {}).items()}
        identity = json.dumps({"pattern": config["pattern"], "special_tokens": specials}, sort_keys=True)
        self.sha256: str | None = hashlib.sha256(raw + identity.encode()).hexdigest()
        self.path = folder
        self.config = config
        self._enc = tiktoken.Encoding(f"bpe-{self.sha256[:12]}", pat_str=config["pattern"],
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.name: str = str(folder)
        self.n_vocab: int = self._enc.n_vocab
        eos = config.get("eos_token")
        self.eos_token_id: int | None = specials.get(eos) if eos else None

    @property
    def eot_token(self) -> int:  # type: ignore[override]
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer {self.name} has no end-of-text token: train it with --special '<|endoftext|>'")
        return self.eos_token_id

    def py_encoder(self) -> PyBPE:
        """The same vocabulary in the pure-Python :class:`PyBPE` (for teaching and for checking tiktoken)."""
        return PyBPE(self._enc._mergeable_ranks, self._enc._special_tokens, self.config["pattern"])

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, n_vocab={self.n_vocab})"


# ---------------------------------------------------------------------------------------------- CLI


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a corpus", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, metavar="SOURCE", help="corpus name, text file, folder, glob, or hf:<dataset>")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="ids in all: 256 bytes + merges + special tokens")
    t.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.tiktoken and tokenizer_config.json")
    t.add_argument("--special", action="append", metavar="TEXT",
                   help=f"a special token (repeatable); default {EOT_TEXT}")
    t.add_argument("--overwrite", action="store_true", help="replace the tokenizer in an existing --out folder")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run_tokenizer(args: argparse.Namespace) -> int:
    from .data import resolve_source

    specials = list(dict.fromkeys(args.special or [EOT_TEXT]))
    if any(not s for s in specials):
        raise ValueError("--special must not be empty text")
    n_merges = args.vocab_size - N_BYTES - len(specials)
    if n_merges < 0:
        raise ValueError(f"--vocab-size {args.vocab_size} is too small: the {N_BYTES} byte tokens and {len(specials)} "
                         f"special token(s) alone need {N_BYTES + len(specials)}")
    out = check_out_folder(args.out, args.overwrite)  # before the training, not after
    docs = resolve_source(args.data)
    start = time.perf_counter()
    texts = [d.path.read_text(encoding="utf-8") if d.path is not None else (d.text or "") for d in docs]
    words = count_words(texts, specials)
    vocab, _ = train_bpe(words, n_merges, progress=args.progress)
    seconds = time.perf_counter() - start
    save_bpe(out, vocab, specials, overwrite=args.overwrite, extra={"trained_on": args.data})
    tok = BPETokenizer(out)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts, allow_special=False))
    print(f"trained {tok.n_vocab:,} tokens ({n_merges:,} merges, {len(specials)} special) on {args.data} "
          f"({n_bytes:,} bytes, {len(words):,} distinct words) in {seconds:.1f} s")
    print(f"  {n_bytes / max(n_tokens, 1):.2f} bytes per token on the training text ({n_tokens:,} tokens)")
    print(f"  saved to {tok.name}  (use it with --tokenizer {args.out})")
    return 0
