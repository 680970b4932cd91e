"""Build script: the Python packages, plus the C++/CUDA extension ``kernels._C`` when it can be built.

The extension's sources live in csrc/: ``*.cpp`` (the op registration and the CPU kernels) and ``*.cu``
(the CUDA kernels).  What gets built depends on the machine, and exactly one line says what was
skipped and why:

* no torch importable in the build environment -> nothing (install requirements.txt first and build
  with ``pip install -e . --no-build-isolation`` so setup.py sees that torch);
* no sources in csrc/ -> nothing;
* CPU-only torch, no CUDA toolkit (CUDA_HOME / nvcc), or ``LLM_SKIP_CUDA_BUILD=1`` -> the CPU part only;
* otherwise the CPU + CUDA extension for ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0": A100 and H100).

``MAX_JOBS`` limits ninja's parallel compile jobs (torch.utils.cpp_extension honours it).
A failed or skipped build never breaks ``import kernels``: the "cuda" backend reports itself
unavailable with the reason.
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def say(message: str) -> None:
    # stderr, so it shows in `pip install -v` output and in plain `python setup.py` runs alike
    print(f"llm-from-scratch: {message}", file=sys.stderr, flush=True)


def find_cuda_home() -> tuple[str | None, str]:
    """The CUDA toolkit root to build against, or None, with what was tried.

    torch guesses the root as the parent of the folder holding ``nvcc`` on PATH, which is wrong when
    that nvcc is a wrapper or link elsewhere (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0), and
    the link then fails on a missing libcudart.  So: $CUDA_HOME or $CUDA_PATH if set, else nvcc's
    toolkit, else /usr/local/cuda -- and a candidate counts only if it has the runtime header and
    library, so an unusable toolkit means a CPU-only build with a reason instead of a failed install.
    """
    def usable(root: str) -> bool:
        has_lib = any(glob.glob(os.path.join(root, d, "libcudart.so*")) for d in ("lib64", "lib"))
        return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and has_lib

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            root = os.environ[var]
            return (root, "") if usable(root) else (None, f"{var}={root} has no include/cuda_runtime.h and lib64/libcudart.so")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if usable(root):
            return root, ""
    return None, f"no CUDA toolkit with cuda_runtime.h and libcudart.so (looked in {', '.join(candidates)}; set CUDA_HOME)"


def extension_modules():
    """Return (ext_modules, cmdclass) for what this machine can build, announcing what it skips."""
    cuda_home, why_no_toolkit = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        say("skipping extension kernels._C: torch is not importable in the build environment "
            "(pip install -r requirements.txt, then pip install -e . --no-build-isolation)")
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
    if not cpp and not cu:
        say("skipping extension kernels._C (CPU and CUDA): csrc/ has no C++/CUDA sources in this version")
        return [], {}

    why_no_cuda = None
    if os.environ.get("LLM_SKIP_CUDA_BUILD") == "1":
        why_no_cuda = "LLM_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        why_no_cuda = why_no_toolkit
    elif not cu:
        why_no_cuda = "csrc/ has no .cu sources"

    flags = {"cxx": ["-O3", "-std=c++20"]}
    if why_no_cuda:
        say(f"building kernels._C for CPU only; skipping its CUDA kernels: {why_no_cuda}")
        ext = cpp_extension.CppExtension("kernels._C", cpp, extra_compile_args=flags)
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        say(f"building kernels._C for CPU and CUDA (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        flags["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        ext = cpp_extension.CUDAExtension("kernels._C", cpp + cu, extra_compile_args=flags)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
