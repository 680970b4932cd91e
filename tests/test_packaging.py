"""The package layout and build script behave as the README promises."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_layout():
    for name in ("kernels", "csrc", "llm", "bench", "tests", "setup.py", "pyproject.toml", "README.md", "requirements.txt"):
        assert (ROOT / name).exists(), f"missing top-level {name}"
    for pkg in ("kernels", "llm"):
        assert (ROOT / pkg / "__init__.py").is_file()


def test_requirements_are_pinned_exactly():
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [l for l in lines if l]
    names = {re.split(r"==", r)[0].lower() for r in reqs}
    assert {"torch", "triton", "tiktoken", "ninja", "numpy", "tqdm", "pytest", "pytest-benchmark"} <= names
    unpinned = [r for r in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.+\-]*", r)]
    assert not unpinned, f"not pinned to one version: {unpinned}"


def test_setup_py_says_in_one_line_which_extensions_it_skips():
    has_sources = any((ROOT / "csrc").rglob("*.cpp")) or any((ROOT / "csrc").rglob("*.cu"))
    env = {**os.environ, "LLM_SKIP_CUDA_BUILD": "1"}  # the one skip reason every machine can produce
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("llm-from-scratch:")]
    assert len(lines) == 1, lines
    if has_sources:
        assert "building kernels._C for CPU only; skipping its CUDA kernels: LLM_SKIP_CUDA_BUILD=1" in lines[0]
    else:
        assert "skipping extension kernels._C" in lines[0] and "no C++/CUDA sources" in lines[0]


def test_unusable_cuda_toolkit_means_a_cpu_only_build_with_the_reason():
    # A toolkit without cuda_runtime.h/libcudart must not fail the install: CPU-only, saying why.
    if not any((ROOT / "csrc").rglob("*.cu")):
        pytest.skip("csrc/ has no CUDA sources, so no CUDA build is attempted")
    env = {**os.environ, "CUDA_HOME": "/nonexistent-cuda"}
    env.pop("LLM_SKIP_CUDA_BUILD", None)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("llm-from-scratch:")]
    assert lines == [
        "llm-from-scratch: building kernels._C for CPU only; skipping its CUDA kernels: "
        "CUDA_HOME=/nonexistent-cuda has no include/cuda_runtime.h and lib64/libcudart.so"
    ]
