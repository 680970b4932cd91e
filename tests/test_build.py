"""setup.py's decisions about the extension kernels._C (issue 12): which archs, what is skipped and why.

``plan_extension`` takes the machine's facts as arguments, so every case runs here with fake machines
(GPUs, compilers, toolkits); a few cases also run ``python setup.py`` for real and check its one line.
No GPU and no compile needed: the failed build uses a compiler that fails at once.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llm_setup", ROOT / "setup.py")
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # defines the functions; setup() runs only as __main__

PREFIX = "llm-from-scratch:"
BUILD_ENV_VARS = ("TORCH_CUDA_ARCH_LIST", "LLM_BUILD_CUDA", "LLM_SKIP_CUDA_BUILD", "LLM_REQUIRE_EXTENSION", "CXX")


def no_gpu_probe():
    raise AssertionError("the GPUs were probed although the arch list was already decided")


def plan(env=None, **facts):
    """plan_extension on a Linux machine with torch 2.14 (CUDA 13.0), g++ as c++, a toolkit and no GPU,
    with ``facts`` replacing any of these."""
    machine = dict(platform="linux", torch_version="2.14.1", torch_cuda="13.0", has_cpp=True, has_cu=True,
                   cxx=("c++", ""), cuda_home=("/usr/local/cuda", ""), gpu_capabilities=lambda: [])
    machine.update(facts)
    return setup_py.plan_extension(env or {}, **machine)


# ------------------------------------------------------------------------------------ the arch list


def test_torch_cuda_arch_list_wins_over_the_ci_switch_and_the_gpus():
    p = plan({"TORCH_CUDA_ARCH_LIST": "8.6+PTX", "LLM_BUILD_CUDA": "1"}, gpu_capabilities=no_gpu_probe)
    assert (p.parts, p.arch_list) == ("cuda", "8.6+PTX")
    assert p.message == "building kernels._C for CPU and CUDA (TORCH_CUDA_ARCH_LIST=8.6+PTX, as set)"


def test_the_ci_switch_builds_turing_to_hopper_without_a_gpu():
    p = plan({"LLM_BUILD_CUDA": "1"}, gpu_capabilities=no_gpu_probe)
    assert (p.parts, p.arch_list) == ("cuda", "7.5;8.0;9.0")
    assert p.message == ("building kernels._C for CPU and CUDA "
                         "(TORCH_CUDA_ARCH_LIST=7.5;8.0;9.0, LLM_BUILD_CUDA=1: Turing to Hopper)")


def test_visible_gpus_give_their_own_archs_once_each():
    p = plan(gpu_capabilities=lambda: [(9, 0), (8, 0), (9, 0)])
    assert (p.parts, p.arch_list) == ("cuda", "8.0;9.0")
    assert p.message.endswith("(TORCH_CUDA_ARCH_LIST=8.0;9.0, the visible GPUs)")
    one = plan(gpu_capabilities=lambda: [(7, 5)])
    assert one.arch_list == "7.5" and one.message.endswith("(TORCH_CUDA_ARCH_LIST=7.5, the visible GPU)")
    # an empty TORCH_CUDA_ARCH_LIST counts as unset
    assert plan({"TORCH_CUDA_ARCH_LIST": " "}, gpu_capabilities=lambda: [(12, 0)]).arch_list == "12.0"


def test_no_gpu_means_the_cpu_kernels_only_and_says_how_to_ask_for_cuda():
    p = plan()
    assert (p.parts, p.arch_list, p.fatal) == ("cpu", None, False)
    assert p.message == (
        "building kernels._C for CPU only; skipping its CUDA kernels: no GPU visible to torch (set "
        'LLM_BUILD_CUDA=1 for Turing to Hopper, or TORCH_CUDA_ARCH_LIST, e.g. "8.0", to build them anyway)'
    )
    assert not plan({"LLM_REQUIRE_EXTENSION": "1"}).fatal  # the CPU part is still built


def test_compiled_targets_are_what_torch_passes_to_nvcc(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_py.CI_CUDA_ARCHS)
    assert setup_py.compiled_cuda_targets(cpp_extension) == "sm_75,sm_80,sm_90"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0 8.0+PTX")
    assert setup_py.compiled_cuda_targets(cpp_extension) == "sm_80,sm_90,compute_80"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Turing")  # torch's names work too
    assert setup_py.compiled_cuda_targets(cpp_extension) == "sm_75,compute_75"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.7.1")
    with pytest.raises(ValueError, match="Unknown CUDA arch"):
        setup_py.compiled_cuda_targets(cpp_extension)


# --------------------------------------------------------------------------------- the skip reasons


def test_cuda_skip_reasons_build_the_cpu_part_and_are_never_fatal():
    required = {"LLM_REQUIRE_EXTENSION": "1", "LLM_BUILD_CUDA": "1"}
    cases = {
        "LLM_SKIP_CUDA_BUILD=1": plan({**required, "LLM_SKIP_CUDA_BUILD": "1"}),
        "torch 2.14.1+cpu is a CPU-only build": plan(required, torch_version="2.14.1+cpu", torch_cuda=None),
        "no toolkit here": plan(required, cuda_home=(None, "no toolkit here")),
        "csrc/ has no .cu sources": plan(required, has_cu=False),
    }
    for why, p in cases.items():
        assert (p.parts, p.fatal) == ("cpu", False), why
        assert p.message == f"building kernels._C for CPU only; skipping its CUDA kernels: {why}"


def test_find_cxx_respects_cxx_then_tries_the_platform_compilers():
    on_path = {"g++", "clang++", "/opt/bin/my-c++"}
    which = lambda name: f"/usr/bin/{name}" if name in on_path else None  # noqa: E731
    assert setup_py.find_cxx({"CXX": "/opt/bin/my-c++"}, "linux", which) == ("/opt/bin/my-c++", "")
    assert setup_py.find_cxx({"CXX": "missing-c++"}, "linux", which) == (None, "CXX=missing-c++ is not an executable on PATH")
    assert setup_py.find_cxx({}, "linux", which) == ("g++", "")  # no c++: g++ stands in
    assert setup_py.find_cxx({}, "darwin", lambda n: "/usr/bin/clang++" if n == "clang++" else None) == ("clang++", "")
    assert setup_py.find_cxx({}, "linux", lambda n: None) == (None, "none of c++, g++, clang++ is on PATH (install one, or set CXX)")
    assert setup_py.find_cxx({}, "win32", lambda n: None) == (None, "none of cl is on PATH (install one, or set CXX)")
    assert setup_py.find_cxx({}, "win32", lambda n: "C:/VS/cl.exe" if n == "cl" else None) == ("cl", "")


def test_the_compiler_found_is_handed_to_torch_only_when_it_is_not_its_default():
    assert plan(cxx=("c++", "")).cxx is None
    assert plan(cxx=("g++", "")).cxx == "g++"  # torch would run c++, which is not there
    assert plan({"CXX": "clang++"}, cxx=("clang++", "")).cxx is None  # $CXX: torch reads it itself
    assert plan(platform="win32", cxx=("cl", "")).cxx is None


def test_no_compiler_skips_the_extension_with_the_reason_and_is_fatal_only_when_required():
    why = "none of c++, g++, clang++ is on PATH (install one, or set CXX)"
    p = plan(cxx=(None, why))
    assert (p.parts, p.fatal) == ("", False)
    assert p.message == ("skipping extension kernels._C (CPU and CUDA): no C++ compiler found: "
                         f"{why}; every op falls back to the Triton/PyTorch backends")
    required = plan({"LLM_REQUIRE_EXTENSION": "1"}, cxx=(None, why))
    assert required.fatal and required.message == p.message + " (LLM_REQUIRE_EXTENSION=1: failing the install)"
    # no torch: nothing either; no sources: nothing, and nothing to require
    assert plan(torch_version=None).message.startswith("skipping extension kernels._C (CPU and CUDA): torch is not importable")
    assert not plan({"LLM_REQUIRE_EXTENSION": "1"}, has_cpp=False, has_cu=False).fatal


def test_compile_flags_per_platform():
    assert setup_py.compile_flags("win32", cuda=False) == {"cxx": ["/O2", "/std:c++20"]}  # MSVC's spelling
    for platform in ("linux", "darwin"):
        assert setup_py.compile_flags(platform, cuda=False) == {"cxx": ["-O3", "-std=c++20"]}
    assert setup_py.compile_flags("linux", cuda=True)["nvcc"][:2] == ["-O3", "-std=c++20"]


def test_the_cpu_sources_build_with_apple_clang():
    # Apple clang has no OpenMP (at::parallel_for is torch's own), and macOS no Linux-only headers
    linux_only = re.compile(r"#\s*pragma\s+omp|#include\s*<(omp\.h|malloc\.h|features\.h|linux/|sys/sysinfo\.h|sched\.h)")
    for path in sorted((ROOT / "csrc").glob("*")):
        if path.suffix in (".cpp", ".h"):
            assert not linux_only.search(path.read_text()), f"{path.name}: not portable to macOS clang"


# ------------------------------------------------------------------------------- setup.py for real


def run_setup(args, tmp=None, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV_VARS}
    env.update(env_overrides)
    cwd = tmp or ROOT
    result = subprocess.run([sys.executable, str(Path(cwd) / "setup.py"), *args], cwd=cwd, capture_output=True,
                            text=True, env=env, timeout=300)
    return result, [line for line in result.stderr.splitlines() if line.startswith(PREFIX)]


def test_setup_py_without_a_compiler_says_so_in_one_line():
    result, lines = run_setup(["--name"], CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr
    assert lines == [f"{PREFIX} skipping extension kernels._C (CPU and CUDA): no C++ compiler found: "
                     "CXX=/nonexistent/c++ is not an executable on PATH; every op falls back to the Triton/PyTorch backends"]
    result, lines = run_setup(["--name"], CXX="/nonexistent/c++", LLM_REQUIRE_EXTENSION="1")
    assert result.returncode != 0 and len(lines) == 1 and lines[0].endswith("(LLM_REQUIRE_EXTENSION=1: failing the install)")


def _cuda_buildable() -> bool:
    import torch

    return torch.version.cuda is not None and setup_py.find_cuda_home()[0] is not None


def test_setup_py_arch_lines():
    if not _cuda_buildable():
        pytest.skip("no CUDA toolkit or a CPU-only torch: the CUDA lines cannot be produced here")
    _, lines = run_setup(["--name"], CUDA_VISIBLE_DEVICES="")  # hides any GPU from torch
    assert lines == [f"{PREFIX} building kernels._C for CPU only; skipping its CUDA kernels: {setup_py.NO_GPU_HINT}"]
    _, lines = run_setup(["--name"], CUDA_VISIBLE_DEVICES="", LLM_BUILD_CUDA="1")
    assert lines == [f"{PREFIX} building kernels._C for CPU and CUDA (TORCH_CUDA_ARCH_LIST=7.5;8.0;9.0, LLM_BUILD_CUDA=1: Turing to Hopper)"]
    _, lines = run_setup(["--name"], LLM_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="8.9")
    assert lines == [f"{PREFIX} building kernels._C for CPU and CUDA (TORCH_CUDA_ARCH_LIST=8.9, as set)"]


@pytest.fixture
def failing_build_tree(tmp_path):
    """A copy of setup.py and csrc/ with a stale library in kernels/, and a C++ compiler (a wrapper of
    the real one, so torch's version checks pass) that fails every compile with an error message."""
    if shutil.which("c++") is None:
        pytest.skip("no c++ to wrap")
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "kernels").mkdir()
    stale = tmp_path / "kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.write_text("a library from an earlier build")
    cxx = tmp_path / "failing-c++"
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -c ] && { echo "failing-c++: error: no" >&2; exit 1; }; done\n'
                   'exec c++ "$@"\n')
    cxx.chmod(0o755)
    return tmp_path, stale, str(cxx)


def test_a_failed_build_is_announced_and_does_not_fail_the_install(failing_build_tree):
    tmp, stale, cxx = failing_build_tree
    result, lines = run_setup(["build_ext", "--inplace"], tmp, CXX=cxx, LLM_SKIP_CUDA_BUILD="1", MAX_JOBS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failing-c++: error: no" in result.stdout + result.stderr  # the compiler's own output stays visible
    assert lines == [
        f"{PREFIX} building kernels._C for CPU only; skipping its CUDA kernels: LLM_SKIP_CUDA_BUILD=1",
        f"{PREFIX} building kernels._C failed (RuntimeError: Error compiling objects for extension); installed "
        f"without it, removed the earlier kernels/{stale.name}: every op falls back to the Triton/PyTorch "
        "backends (the compiler's output is above; LLM_REQUIRE_EXTENSION=1 makes this an error)",
    ]
    assert not stale.exists()  # an old library would be loaded with ops these sources no longer match


def test_a_failed_build_fails_the_install_when_the_extension_is_required(failing_build_tree):
    tmp, _stale, cxx = failing_build_tree
    result, lines = run_setup(["build_ext", "--inplace"], tmp, CXX=cxx, LLM_SKIP_CUDA_BUILD="1", MAX_JOBS="1",
                              LLM_REQUIRE_EXTENSION="1")
    assert result.returncode != 0
    assert lines[-1] == (f"{PREFIX} building kernels._C failed (RuntimeError: Error compiling objects for extension); "
                         "LLM_REQUIRE_EXTENSION=1: failing the install")


# --------------------------------------------------------------------------------------------- OpenMP

def test_openmp_is_on_where_torch_uses_it_and_the_compiler_takes_it():
    # at::parallel_for in our library is an `omp parallel` pragma: without the flag, one thread.
    assert setup_py.openmp_flags("linux", "c++", torch_has_openmp=False) == []
    assert setup_py.openmp_flags("win32", "cl", torch_has_openmp=True) == ["/openmp"]
    assert setup_py.openmp_flags("linux", "/nonexistent/c++", torch_has_openmp=True) == []  # tried, failed: left out
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ here to try -fopenmp with")
    assert setup_py.openmp_flags("linux", gxx, torch_has_openmp=True) == ["-fopenmp"]


def test_the_built_cpu_kernels_run_on_every_thread():
    import torch

    import kernels

    if kernels.available_backends("cpu")["cuda"] or not torch._C.has_openmp:
        pytest.skip("needs the built extension and an OpenMP torch")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the library's dynamic dependencies with ldd")
    import kernels._C as ext

    deps = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True).stdout
    assert "libgomp" in deps or "libomp" in deps, deps  # the pragmas were compiled in
