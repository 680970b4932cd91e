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
