"""The package layout and build script behave as the README promises."""
import json
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


@pytest.mark.parametrize("file, needed", [
    ("requirements.txt", {"torch", "triton", "tiktoken", "ninja", "numpy", "tqdm", "pytest", "pytest-benchmark"}),
    ("requirements-extras.txt", {"gguf", "tensorboard", "lm-eval"}),
])
def test_requirements_are_pinned_exactly(file, needed):
    lines = [l.split("#")[0].strip() for l in (ROOT / file).read_text().splitlines()]
    reqs = [l.split(";")[0].strip() for l in lines if l]  # the pin, without its environment marker
    names = {re.split(r"==", r)[0].lower() for r in reqs}
    assert needed <= names
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


# ----------------------------------------------------------------- requirements.txt on every platform
#
# pip's --platform matches wheel tags exactly, so each target names its whole tag family (every
# manylinux_2_N up to the glibc torch needs, several macOS versions).  pip evaluates environment markers
# (ours and those in the dependencies' metadata, e.g. torch's `nvidia-*; platform_system == "Linux"`)
# for the machine it runs on, and has no option to name another: so the resolver runs in a child
# process whose marker environment is the target's (RESOLVE below).

def _manylinux(arch: str) -> list[str]:
    return [f"manylinux_2_{n}_{arch}" for n in range(28, 4, -1)] + [f"manylinux2014_{arch}", f"linux_{arch}"]


def _macos(arch: str, majors=range(15, 10, -1)) -> list[str]:
    tags = [f"macosx_{m}_0_{a}" for m in majors for a in (arch, "universal2")]
    if arch == "x86_64":
        tags += [f"macosx_10_{m}_{a}" for m in range(15, 8, -1) for a in (arch, "universal2", "intel")]
    return tags


# name -> (the environment markers see there, wheel tags)
PLATFORMS = {
    "linux-x86_64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
                     _manylinux("x86_64")),
    "linux-aarch64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
                      _manylinux("aarch64")),
    "macos-arm64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
                    _macos("arm64")),
    "macos-x86_64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
                     _macos("x86_64")),
    "windows-x86_64": ({"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
                        "os_name": "nt"}, ["win_amd64"]),
}
PYPI = "https://pypi.org/simple"


def _marker_env(platform: str) -> dict[str, str]:
    """What environment markers see on ``platform`` with CPython 3.11."""
    from packaging.markers import default_environment

    return {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.9",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "platform_release": "", "platform_version": "", **PLATFORMS[platform][0]}


def _pins_for(platform: str) -> list[str]:
    """The lines of requirements.txt whose markers hold on ``platform`` (Python 3.11), markers dropped."""
    from packaging.requirements import Requirement

    env = _marker_env(platform)
    pins = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                pins.append(f"{req.name}{req.specifier}")
    return pins


def test_requirements_markers_leave_out_only_what_a_platform_has_no_wheel_for():
    names = {p: {pin.split("==")[0] for pin in _pins_for(p)} for p in PLATFORMS}
    everything = names["linux-x86_64"]
    assert names["linux-aarch64"] == everything and "triton" in everything and "torch" in everything
    assert everything - names["macos-arm64"] == {"triton"}
    assert everything - names["windows-x86_64"] == {"triton"}
    assert everything - names["macos-x86_64"] == {"triton", "torch"}  # no torch wheels after 2.2.2 there


def _index_reachable() -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{PYPI}/pip/", timeout=10):
            return True
    except OSError:
        return False


# pip, with every marker evaluated in the environment given as argv[1] (JSON); the rest of argv is pip's.
RESOLVE = """
import json, sys
import pip._vendor.packaging.markers as markers
target = json.loads(sys.argv[1])
markers.default_environment = lambda: dict(target)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_requirements_resolve_on(platform, tmp_path):
    if not _index_reachable():
        pytest.skip(f"the package index {PYPI} cannot be reached from this machine, so requirements.txt "
                    f"cannot be resolved for {platform} here")
    cmd = [sys.executable, "-c", RESOLVE, json.dumps(_marker_env(platform)), "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
           "--target", str(tmp_path / "target"), "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--index-url", PYPI,
           "-r", str(ROOT / "requirements.txt")]
    cmd += [arg for tag in PLATFORMS[platform][1] for arg in ("--platform", tag)]
    if tuple(int(x) for x in __import__("pip").__version__.split(".")[:2]) < (24, 0):
        cmd.append("--use-feature=fast-deps")  # reads only each wheel's metadata (HTTP range requests)
    # This machine's pip configuration (local wheel folders, constraints) must not take part.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, (
        f"requirements.txt does not resolve for {platform}:\n" + "\n".join(result.stderr.splitlines()[-6:]))
    would = result.stdout.split("Would install", 1)[-1].lower()
    for pin in _pins_for(platform):  # each of our pins, at its version (pip writes name-version)
        name, version = pin.split("==")
        assert f"{name.lower()}-{version}" in would.replace("_", "-"), (pin, result.stdout[-2000:])
