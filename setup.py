"""Build script: the Python packages, plus the C++/CUDA extension ``kernels._C`` when it can be built.

The extension's sources live in csrc/: ``*.cpp`` (the op registration and the CPU kernels) and ``*.cu``
(the CUDA kernels).  What gets built depends on the machine, and exactly one line says what is built
and what was skipped and why (``plan_extension`` decides; tests/test_build.py calls it with fake
machines):

* no torch importable in the build environment -> nothing (install requirements.txt first and build
  with ``pip install -e . --no-build-isolation`` so setup.py sees that torch);
* no sources in csrc/ -> nothing;
* no C++ compiler (``$CXX`` if set, else ``c++``, ``g++`` or ``clang++``; ``cl`` on Windows) -> nothing;
* CPU-only torch, no CUDA toolkit (CUDA_HOME / nvcc), or ``LLM_SKIP_CUDA_BUILD=1`` -> the CPU part only;
* otherwise the CPU + CUDA extension, for the archs chosen in this order: ``$TORCH_CUDA_ARCH_LIST``
  if set; ``LLM_BUILD_CUDA=1`` (what CI sets) -> "7.5;8.0;9.0", Turing to Hopper; else the compute
  capabilities of the GPUs torch sees; with no GPU visible, the CPU part only (compiling CUDA code
  that nothing here can run would cost minutes), and the line says how to ask for it anyway.

A build that fails anyway (a compiler error, a toolkit too old for a GPU's arch) does not fail the
install: one more line names the failure and says that every op falls back to the Triton/PyTorch
backends.  ``LLM_REQUIRE_EXTENSION=1`` (CI sets it) turns that, and a skip of the whole extension for
want of torch or a compiler, into an error.  ``MAX_JOBS`` limits ninja's parallel compile jobs (torch.utils.cpp_extension
honours it).  A failed or skipped build never breaks ``import kernels``: the "cuda" backend reports
itself unavailable with the reason.

The library records the CUDA targets it was compiled for (``kernels._C.cuda_archs``, e.g.
"sm_75,sm_80,sm_90"), so the backend can say "rebuild for this GPU" instead of failing at launch.
"""
import glob
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

# What LLM_BUILD_CUDA=1 compiles for: Turing (T4), Ampere (A100; 8.6/8.9 cards run its sm_80 code), Hopper.
CI_CUDA_ARCHS = "7.5;8.0;9.0"
NO_GPU_HINT = (
    "no GPU visible to torch (set LLM_BUILD_CUDA=1 for Turing to Hopper, or TORCH_CUDA_ARCH_LIST, "
    "e.g. \"8.0\", to build them anyway)"
)
FALLBACK = "every op falls back to the Triton/PyTorch backends"


def say(message: str) -> None:
    # stderr, so it shows in `pip install -v` output and in plain `python setup.py` runs alike
    print(f"llm-from-scratch: {message}", file=sys.stderr, flush=True)


def find_cuda_home(env: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """The CUDA toolkit root to build against, or None, with what was tried.

    torch guesses the root as the parent of the folder holding ``nvcc`` on PATH, which is wrong when
    that nvcc is a wrapper or link elsewhere (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0), and
    the link then fails on a missing libcudart.  So: $CUDA_HOME or $CUDA_PATH if set, else nvcc's
    toolkit, else /usr/local/cuda -- and a candidate counts only if it has the runtime header and
    library, so an unusable toolkit means a CPU-only build with a reason instead of a failed install.
    """
    def usable(root: str) -> bool:
        libs = (("lib64", "libcudart.so*"), ("lib", "libcudart.so*"), (os.path.join("lib", "x64"), "cudart.lib"))  # Linux, Windows
        has_lib = any(glob.glob(os.path.join(root, d, name)) for d, name in libs)
        return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and has_lib

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            root = env[var]
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


def find_cxx(env: Mapping[str, str], platform: str, which: Callable[[str], str | None] = shutil.which) -> tuple[str | None, str]:
    """The C++ compiler the build will run, or None and why.

    torch.utils.cpp_extension runs ``$CXX`` if set, else ``c++`` (``cl`` on Windows), so $CXX is
    respected as given; without it, ``g++`` or ``clang++`` stand in for a missing ``c++`` (the caller
    then sets $CXX to the one found).
    """
    if env.get("CXX"):
        cxx = env["CXX"]
        return (cxx, "") if which(cxx) else (None, f"CXX={cxx} is not an executable on PATH")
    names = ("cl",) if platform == "win32" else ("c++", "g++", "clang++")
    for name in names:
        if which(name):
            return name, ""
    return None, f"none of {', '.join(names)} is on PATH (install one, or set CXX)"


def cuda_arch_list(env: Mapping[str, str], gpu_capabilities: Callable[[], list[tuple[int, int]]]) -> tuple[str | None, str]:
    """The TORCH_CUDA_ARCH_LIST to compile the CUDA kernels for, and where it came from.

    In order: $TORCH_CUDA_ARCH_LIST as set; LLM_BUILD_CUDA=1 -> CI_CUDA_ARCHS; the deduplicated compute
    capabilities of the visible GPUs (``gpu_capabilities`` is only called when needed: it initializes
    CUDA).  With none of these: (None, why), a CPU-only build.
    """
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return env["TORCH_CUDA_ARCH_LIST"].strip(), "as set"
    if env.get("LLM_BUILD_CUDA") == "1":
        return CI_CUDA_ARCHS, "LLM_BUILD_CUDA=1: Turing to Hopper"
    caps = sorted(set(gpu_capabilities()))
    if caps:
        return ";".join(f"{major}.{minor}" for major, minor in caps), "the visible GPU" + ("s" if len(caps) > 1 else "")
    return None, NO_GPU_HINT


@dataclass(frozen=True)
class Plan:
    """What to build: ``parts`` is "" (nothing), "cpu" or "cuda" (CPU + CUDA); ``message`` the one line."""

    parts: str
    message: str
    cxx: str | None = None          # the compiler to put in $CXX, when it is not torch's default
    arch_list: str | None = None    # TORCH_CUDA_ARCH_LIST for a "cuda" build
    fatal: bool = False             # LLM_REQUIRE_EXTENSION=1 and no extension can be built


def plan_extension(
    env: Mapping[str, str],
    *,
    platform: str,
    torch_version: str | None,
    torch_cuda: str | None,
    has_cpp: bool,
    has_cu: bool,
    cxx: tuple[str | None, str],
    cuda_home: tuple[str | None, str],
    gpu_capabilities: Callable[[], list[tuple[int, int]]],
) -> Plan:
    """Decide what this machine builds, from facts gathered by ``machine_facts`` (or faked by a test).

    torch_version None: torch is not importable; torch_cuda: ``torch.version.cuda``; cxx and cuda_home:
    ``find_cxx`` / ``find_cuda_home``'s answers.  Under LLM_REQUIRE_EXTENSION=1 a plan that builds
    nothing for want of torch or a compiler is fatal; a CPU-only build is not (CI checks that its
    library holds the CUDA code it asked for: tests/test_cuda_resources.py).
    """
    required = env.get("LLM_REQUIRE_EXTENSION") == "1"

    def nothing(why: str, involuntary: bool = True) -> Plan:
        fatal = required and involuntary
        note = " (LLM_REQUIRE_EXTENSION=1: failing the install)" if fatal else ""
        return Plan("", f"skipping extension kernels._C (CPU and CUDA): {why}{note}", fatal=fatal)

    if torch_version is None:
        return nothing("torch is not importable in the build environment "
                       "(pip install -r requirements.txt, then pip install -e . --no-build-isolation)")
    if not has_cpp and not has_cu:
        return nothing("csrc/ has no C++/CUDA sources in this version", involuntary=False)
    compiler, why_no_cxx = cxx
    if compiler is None:
        return nothing(f"no C++ compiler found: {why_no_cxx}; {FALLBACK}")
    default_cxx = "cl" if platform == "win32" else "c++"
    set_cxx = None if env.get("CXX") or compiler == default_cxx else compiler

    if env.get("LLM_SKIP_CUDA_BUILD") == "1":
        why_no_cuda = "LLM_SKIP_CUDA_BUILD=1"
    elif torch_cuda is None:
        why_no_cuda = f"torch {torch_version} is a CPU-only build"
    elif cuda_home[0] is None:
        why_no_cuda = cuda_home[1]
    elif not has_cu:
        why_no_cuda = "csrc/ has no .cu sources"
    else:
        arch_list, source = cuda_arch_list(env, gpu_capabilities)
        if arch_list is not None:
            return Plan("cuda", f"building kernels._C for CPU and CUDA (TORCH_CUDA_ARCH_LIST={arch_list}, {source})",
                        cxx=set_cxx, arch_list=arch_list)
        why_no_cuda = source
    return Plan("cpu", f"building kernels._C for CPU only; skipping its CUDA kernels: {why_no_cuda}", cxx=set_cxx)


def visible_gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability of every GPU torch sees (CUDA_VISIBLE_DEVICES applies); [] without one."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def compile_flags(platform: str, cuda: bool) -> dict[str, list[str]]:
    """Optimization and language flags per compiler: MSVC spells them /O2 /std:c++20, gcc/clang -O3 -std=c++20."""
    flags = {"cxx": ["/O2", "/std:c++20"] if platform == "win32" else ["-O3", "-std=c++20"]}
    if cuda:  # nvcc takes the same spelling everywhere and passes the right one to its host compiler
        flags["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
    return flags


def openmp_flags(platform: str, compiler: str, torch_has_openmp: bool) -> list[str]:
    """The flag that turns on OpenMP, if this compiler takes it, when torch itself uses OpenMP.

    The CPU kernels parallelize with ``at::parallel_for``, which in an OpenMP build of torch is an
    ``#pragma omp parallel`` compiled into *our* library: without the flag the pragma is ignored and
    every kernel runs on one thread (measured: the same time with 1 or 2 threads).  MSVC always has
    /openmp; gcc has -fopenmp; clang only with an OpenMP runtime installed (Apple's has none), so the
    flag is tried on an empty program first, and left out -- one thread, still correct -- if it fails.
    """
    if not torch_has_openmp:
        return []
    if platform == "win32":
        return ["/openmp"]
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([compiler, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    return ["-fopenmp"] if ok else []


def compiled_cuda_targets(cpp_extension) -> str:
    """The code nvcc will embed for $TORCH_CUDA_ARCH_LIST, as torch turns it into -gencode flags:
    "sm_75,sm_80,sm_90" (cubins), plus "compute_XY" for each PTX ("+PTX").  Raises ValueError for an
    arch torch does not know."""
    flags = cpp_extension._get_cuda_arch_flags()
    targets = {m.group(1) for f in flags for m in [re.search(r"code=((?:sm|compute)_\w+)", f)] if m}
    return ",".join(sorted(targets, key=lambda t: (t.startswith("compute"), int(re.sub(r"\D", "", t)), t)))


def tolerant_build_ext(base: type, required: bool) -> type:
    """``base`` (torch's BuildExtension) whose failure, unless ``required``, is announced in one line
    and leaves the package installed without kernels._C instead of failing the install."""

    class BuildExt(base):
        def run(self) -> None:
            inplace = self.inplace or getattr(self, "editable_mode", False)  # run() resets inplace on a failure
            try:
                super().run()
            except Exception as exc:  # a compiler or linker error, a missing ninja, an unknown arch, ...
                what = str(exc).strip().splitlines()
                failure = f"{type(exc).__name__}: {what[-1] if what else ''}".rstrip(": ")
                if required:
                    say(f"building kernels._C failed ({failure}); LLM_REQUIRE_EXTENSION=1: failing the install")
                    raise
                # an editable install keeps the library beside the sources: one from an earlier build
                # would be loaded with ops these sources no longer match, so it goes too
                stale = ROOT / self.get_ext_filename("kernels._C")
                removed = ""
                if inplace and stale.exists():
                    stale.unlink()
                    removed = f", removed the earlier {stale.relative_to(ROOT)}"
                say(f"building kernels._C failed ({failure}); installed without it{removed}: {FALLBACK} "
                    "(the compiler's output is above; LLM_REQUIRE_EXTENSION=1 makes this an error)")

    return BuildExt


def extension_modules():
    """Return (ext_modules, cmdclass) for what this machine can build, announcing in one line what it skips."""
    cuda_home = find_cuda_home()
    if cuda_home[0]:
        os.environ["CUDA_HOME"] = cuda_home[0]  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        torch = cpp_extension = None
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
    plan = plan_extension(
        os.environ, platform=sys.platform, torch_version=torch and torch.__version__,
        torch_cuda=torch and torch.version.cuda, has_cpp=bool(cpp), has_cu=bool(cu),
        cxx=find_cxx(os.environ, sys.platform), cuda_home=cuda_home, gpu_capabilities=visible_gpu_capabilities,
    )
    arch_define = None
    if plan.parts == "cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
        try:
            targets = compiled_cuda_targets(cpp_extension)
        except Exception as exc:  # e.g. ValueError: Unknown CUDA arch (8.7.1) or GPU not supported
            plan = Plan("cpu", f"building kernels._C for CPU only; skipping its CUDA kernels: "
                               f"TORCH_CUDA_ARCH_LIST={plan.arch_list}: {exc}", cxx=plan.cxx)
        else:
            # for ops.cpp, in the C++ compiler's flags only: nvcc would split the commas into separate
            # -D's (sm_80 as a macro breaks CUDA's own headers).  No quotes (ninja's shell would eat
            # them): ops.cpp stringifies the value.
            arch_define = f"{'/D' if sys.platform == 'win32' else '-D'}LLM_CUDA_ARCHS={targets}"
    say(plan.message)
    if plan.fatal:
        raise SystemExit(1)
    if not plan.parts:
        return [], {}
    if plan.cxx:
        os.environ["CXX"] = plan.cxx  # torch's build runs $CXX, else c++
    flags = compile_flags(sys.platform, cuda=plan.parts == "cuda")
    omp = openmp_flags(sys.platform, plan.cxx or os.environ.get("CXX") or "c++", torch._C.has_openmp)
    flags["cxx"] += omp
    link = {"extra_link_args": omp} if omp and sys.platform != "win32" else {}
    if plan.parts == "cuda":
        flags["cxx"].append(arch_define)
        ext = cpp_extension.CUDAExtension("kernels._C", cpp + cu, extra_compile_args=flags, **link)
    else:
        ext = cpp_extension.CppExtension("kernels._C", cpp, extra_compile_args=flags, **link)
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": tolerant_build_ext(base, required=os.environ.get("LLM_REQUIRE_EXTENSION") == "1")}


if __name__ == "__main__":  # how pip and `python setup.py` run it; tests import it for its functions
    from setuptools import setup

    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
