"""Tokenizers other than GPT-2's, loaded from a Hugging Face ``tokenizer.json``.

Llama 3, Qwen3 and most models on the Hub ship their tokenizer as one ``tokenizer.json`` (the
vocabulary, the merges, the pre-tokenizer regex and the special tokens), read by Hugging Face's
``tokenizers`` package (Rust, like tiktoken).  :class:`HFTokenizer` wraps it with the methods and
semantics of :class:`llm.tokenizer.Tokenizer`, so the data pipeline, training and generation take
either::

    >>> tok = get_tokenizer("path/to/Llama-3.2-1B")        # a folder holding tokenizer.json, or the file
    >>> tok.decode(tok.encode("Hello, world"))
    'Hello, world'

Two differences from calling ``tokenizers`` directly, both to match GPT-2's wrapper:

* ``encode`` never adds the post-processor's special tokens (Llama 3's ``<|begin_of_text|>``):
  it returns the ids of the text and nothing else, as tiktoken does.
* ``allow_special=False`` encodes a literal special token (``"<|im_end|>"`` in user data) as
  ordinary text instead of the control token.

The end-of-text id (``eot_token``, the document separator of prepared corpora and the default stop
of generation) is the ``eos_token`` of a ``tokenizer_config.json`` next to the file when there is
one, else the first special token of the file with a well-known end-of-text spelling
(:data:`KNOWN_EOS`).  A tokenizer without one still encodes and decodes; only what needs the id
(joining documents, an empty prompt, instruction data) raises a ValueError saying so.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["HFTokenizer", "KNOWN_EOS", "TOKENIZER_FILE", "resolve_tokenizer_file"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")
"""End-of-text spellings looked for among a tokenizer's special tokens when no
``tokenizer_config.json`` names its ``eos_token`` (GPT-2 and Qwen, Llama 3, Llama 2 and Mistral,
Gemma, Phi-3)."""


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("a tokenizer.json needs the Hugging Face `tokenizers` package: pip install tokenizers "
                          "(or pip install .[hf])") from exc
    return tokenizers


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path`` means: the file itself, or the one inside a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        file = p / TOKENIZER_FILE
        if file.is_file():
            return file.resolve()
        others = [n for n in ("tokenizer.model", "vocab.json", "merges.txt") if (p / n).exists()]
        hint = (f" (it has {', '.join(others)}: only the tokenizer.json format is read; "
                "transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one)"
                if others else "")
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} has no {TOKENIZER_FILE}{hint}")
    if p.is_file():
        return p.resolve()
    raise FileNotFoundError(f"tokenizer {str(path)!r}: no such file or folder; expected 'gpt2' or the path of a "
                            f"Hugging Face {TOKENIZER_FILE} (or of a folder that holds one)")


class HFTokenizer:
    """A ``tokenizer.json``: text <-> token ids in ``[0, n_vocab)``, with :class:`~llm.tokenizer.Tokenizer`'s API.

    ``name`` is the file's absolute path (what checkpoints and token files record, and what
    :func:`~llm.tokenizer.get_tokenizer` loads again); ``sha256`` is of its bytes, so token files
    can tell a tokenizer edited in place from the one that made them.
    """

    def __init__(self, path: str | Path) -> None:
        tokenizers = _import_tokenizers()
        self.path = resolve_tokenizer_file(path)
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8")
            self._tok = tokenizers.Tokenizer.from_str(text)
            # A second instance that treats special-token text as text: encode_special_tokens is a
            # setting of the object, not of a call, so flipping one shared object would not be thread-safe.
            self._plain = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{self.path} is not a valid Hugging Face tokenizer.json: {exc}") from exc
        self._plain.encode_special_tokens = True
        self.name: str = str(self.path)
        self.sha256: str = hashlib.sha256(raw).hexdigest()
        # The largest id + 1 (not get_vocab_size(), which counts entries): ids index the embedding.
        self.n_vocab: int = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eos_token_id: int | None = self._find_eos()

    # -- the end-of-text token ------------------------------------------------------------------

    def _find_eos(self) -> int | None:
        config = self.path.parent / CONFIG_FILE
        if config.is_file():
            try:
                eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{config}: not a JSON object ({exc})") from None
            if isinstance(eos, dict):  # older files store an AddedToken: {"content": "</s>", ...}
                eos = eos.get("content")
            if isinstance(eos, str):
                eos_id = self._tok.token_to_id(eos)
                if eos_id is None:
                    raise ValueError(f"{config}: eos_token {eos!r} is not a token of {self.path}")
                return eos_id
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return next((specials[s] for s in KNOWN_EOS if s in specials), None)

    @property
    def eot_token(self) -> int:
        """The end-of-text id; ValueError when this tokenizer has none (see the module docstring)."""
        if self.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.name} has no end-of-text token: none of its special tokens is one of "
                f"{', '.join(KNOWN_EOS)} and no {CONFIG_FILE} beside it names an eos_token; add a "
                f'{CONFIG_FILE} such as {{"eos_token": "<|endoftext|>"}} naming one of its tokens')
        return self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Ids are in ``[0, vocab_size)``: a model needs at least this many embedding rows."""
        return self.n_vocab

    # -- text <-> ids -----------------------------------------------------------------------------

    def _encoder(self, allow_special: bool):
        return self._tok if allow_special else self._plain

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added).  With ``allow_special`` (the default) a special
        token's text becomes its id; without it, it is encoded as ordinary characters."""
        return self._encoder(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(
        self, texts: Sequence[str], *, allow_special: bool = True, num_threads: int = 8
    ) -> list[list[int]]:
        """:meth:`encode` for many texts at once, in parallel (``num_threads`` is accepted for the
        GPT-2 tokenizer's signature; ``tokenizers`` sizes its pool from ``RAYON_NUM_THREADS``)."""
        encodings = self._encoder(allow_special).encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a 1-D sequence of ids (list, NumPy array or 1-D tensor); special tokens are kept as text."""
        from .tokenizer import as_id_list

        return self._tok.decode(as_id_list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eos_token_id={self.eos_token_id})"
