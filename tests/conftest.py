"""Shared pytest setup.

GPU-only tests carry ``@pytest.mark.gpu`` and are skipped cleanly when no CUDA device is present.
Data and the GPT-2 vocabulary come from the environment (``LLM_DATA_DIR``, ``TIKTOKEN_CACHE_DIR``);
on a machine with internet the project downloads them itself.  Anything a test writes goes to a
per-session temporary cache (``LLM_CACHE_DIR``) so the user's own cache is never touched.
"""
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on the CPU.  Triton reads this when
# `import triton` runs and when each @triton.jit kernel is decorated, so it is set here, before any
# test imports triton or a kernel module.  (Backend selection reads it at call time: tests that need
# the "no interpreter" situation unset it with monkeypatch.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
        if "gpu" in item.keywords:
            item.add_marker(skip)
