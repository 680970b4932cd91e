"""Shared pytest setup.

GPU-only tests carry ``@pytest.mark.gpu`` and are skipped cleanly when no CUDA device is present.
Those that also carry ``@pytest.mark.dry_run`` run on the CPU instead when ``LLM_GPU_DRY_RUN=1``
(``bash bench/gpu_check.sh --dry-run`` sets it): at tiny shapes, the Triton kernels in Triton's
interpreter and the extension's ops on their C++ CPU twins, so the GPU check's own test code has run
before a GPU ever sees it.
Data and the GPT-2 vocabulary come from the environment (``LLM_DATA_DIR``, ``TIKTOKEN_CACHE_DIR``);
on a machine with internet the project downloads them itself.  Anything a test writes goes to a
per-session temporary cache (``LLM_CACHE_DIR``) so the user's own cache is never touched.
"""
import json
import math
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on the CPU.  Triton reads this when
# `import triton` runs and when each @triton.jit kernel is decorated, so it is set here, before any
# test imports triton or a kernel module.  (Backend selection reads it at call time: tests that need
# the "no interpreter" situation unset it with monkeypatch.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU_DRY_RUN = os.environ.get("LLM_GPU_DRY_RUN") == "1"


def pytest_configure(config):
    # The tests run tiny models, where thread start-up costs more than it saves: on CI's 2 cores one
    # thread made a tiny-model forward ~10x faster than two.  (Subprocesses choose their own.)
    torch.set_num_threads(1)
    # Must be set before any test imports llm.data; tmp dirs from pytest come too late for that.
    if "LLM_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["LLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="llm-test-cache-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (GPU_DRY_RUN and "dry_run" in item.keywords):
            item.add_marker(skip)


# ------------------------------------------------------------------------------ low-precision rule

FORWARD_OUTPUTS = ("out", "y", "sum", "loss")  # every other compared output is a gradient


class LowPrecisionRule:
    """Our error against the fp32 reference is at most twice PyTorch's own error in the same dtype,
    plus ``atol`` times the reference's largest magnitude (flash-attention's test rule).

    Each comparison is also kept in the test's junit properties ("lowp", JSON), from which
    bench/gpu_check.py builds its pass/fail table per kernel x dtype x direction; ``start`` names the
    case first, so a test that dies before comparing still shows up under its kernel and dtype.
    """

    def __init__(self, request):
        self._node = request.node
        self._case = None

    def _record(self, name: str, value: dict) -> None:
        self._node.user_properties.append((name, json.dumps(value)))

    def start(self, backend: str, op: str, dtype: torch.dtype) -> None:
        self._case = {"kernel": f"{backend}.{op}", "dtype": str(dtype).replace("torch.", "")}
        self._record("lowp_case", self._case)

    def compare(self, outputs: dict, *, atol: float) -> None:
        """outputs: name -> (ours, PyTorch's own in the same dtype, the fp32 reference)."""
        assert self._case is not None, "call start() first"
        failures = []
        for name, (ours, theirs, exact) in outputs.items():
            exact = exact.double()
            scale = exact.abs().max().item() or 1.0
            err = (ours.double() - exact).abs().max().item()
            err_pt = (theirs.double() - exact).abs().max().item()
            bound = 2 * err_pt + atol * scale
            finite = bool(torch.isfinite(ours).all())
            ok = finite and err <= bound and not math.isnan(err)
            direction = "fwd" if name in FORWARD_OUTPUTS else "bwd"
            self._record("lowp", {**self._case, "direction": direction, "output": name, "ours": err,
                                  "pytorch": err_pt, "bound": bound, "ok": ok})
            if not ok:
                what = "non-finite values" if not finite else f"max error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + atol {atol * scale:.3g}"
                failures.append(f"{name}: {what}")
        if failures:
            pytest.fail(f"{self._case['kernel']} {self._case['dtype']}: " + "; ".join(failures), pytrace=False)


@pytest.fixture
def lowp(request):
    return LowPrecisionRule(request)


# ------------------------------------------------------------------------------ a tokenizer.json

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The pre-tokenizer regex of Llama 3's tokenizer.json (Qwen's differs only in splitting digits one by one)."""


def train_tiny_tokenizer(folder, *, vocab_size: int = 300, special_tokens=("<|endoftext|>",),
                         pattern: str | None = None, extra_text=()):
    """A byte-level BPE trained (in milliseconds) on tinyshakespeare's first 400 lines, saved as
    ``folder/tokenizer.json``; returns that path.  The special tokens take the first ids.

    Byte-level like GPT-2's, Llama 3's and Qwen's: every text encodes.  ``pattern`` is a
    pre-tokenizer regex split before the byte mapping, as Llama 3's file has; without it the byte
    level uses GPT-2's own regex.  ``extra_text`` is trained on too (to get particular merges).
    """
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from llm.data import fetch_corpus

    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = fetch_corpus("tinyshakespeare").read_text(encoding="utf-8").splitlines()[:400]
    tok.train_from_iterator([*lines, *extra_text], trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A folder holding a 300-id tokenizer.json whose id 0 is <|endoftext|> (a stand-in for a model folder)."""
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    train_tiny_tokenizer(folder)
    return folder
