"""The extension's CUDA kernels as built, read from the library itself (no GPU needed).

``cuobjdump --dump-resource-usage`` lists each kernel's registers, stack frame, local and static shared
memory for every arch in the fat binary; ``cuobjdump --dump-sass`` gives the machine code.  For every
arch built (the library records them in ``kernels._C.cuda_archs``; CI, with LLM_BUILD_CUDA=1, builds
sm_75, sm_80 and sm_90): no kernel spills (a spill needs a stack frame / local memory), static shared
memory stays within the 48 KiB a block gets without opting in (the dynamic shared memory the launchers
request is checked at compile time: static_asserts in csrc/attention_cuda.cuh), and the attention
kernels multiply on the tensor cores (HMMA instructions in their SASS) from sm_80 on; below that they
are a trap only (their mma.sync needs sm_80, and the launchers refuse such a GPU).

Under LLM_BUILD_CUDA=1 without TORCH_CUDA_ARCH_LIST (CI) a library without CUDA code fails here instead
of skipping: CI must keep compiling the CUDA kernels, Turing to Hopper.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

_C = pytest.importorskip("kernels._C", reason="kernels._C is not built; run `pip install -e . --no-build-isolation`")

STATIC_SHARED_LIMIT = 48 * 1024
ATTENTION_MMA_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
CI_ARCHS = {"sm_75", "sm_80", "sm_90"}  # setup.py's LLM_BUILD_CUDA=1 list, Turing to Hopper


def _ci_build() -> bool:
    """CI's build: LLM_BUILD_CUDA=1 chose the archs, so the library must hold CUDA code for CI_ARCHS."""
    return os.environ.get("LLM_BUILD_CUDA") == "1" and not os.environ.get("TORCH_CUDA_ARCH_LIST")


def _no_cuda_code(why: str):
    if _ci_build():
        pytest.fail(f"LLM_BUILD_CUDA=1, yet {why}: CI no longer compiles the CUDA kernels")
    pytest.skip(why)


def _built_archs() -> set[str]:
    """The cubin archs setup.py compiled for, as the library records them ("sm_75,sm_80,sm_90")."""
    return {t for t in getattr(_C, "cuda_archs", "").split(",") if t.startswith("sm_")}


def _sm(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


def _cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the library with")


def _dump(flag: str) -> str:
    out = subprocess.run([_cuobjdump(), flag, str(Path(_C.__file__))], capture_output=True, text=True, timeout=300)
    if "does not contain device code" in out.stderr + out.stdout or (out.returncode != 0 and not out.stdout):
        _no_cuda_code("kernels._C was built without its CUDA kernels (CPU-only build)")
    assert out.returncode == 0, out.stderr
    return out.stdout


def _per_arch(text: str, header: str) -> dict[str, dict[str, str]]:
    """{arch: {mangled function name: its section}} from cuobjdump's per-ELF output."""
    arches: dict[str, dict[str, str]] = {}
    for elf in re.split(r"\n(?=Fatbin elf code:)", text):
        m = re.search(r"arch = (sm_\d+)", elf)
        if not m:
            continue
        funcs = arches.setdefault(m.group(1), {})
        for part in re.split(rf"\n\s*(?={header})", elf)[1:]:
            name = re.match(rf"{header}\s*(\S+?):?\s*\n", part + "\n")
            if name:
                funcs[name.group(1)] = part
    return arches


@pytest.fixture(scope="module")
def resources():
    arches = _per_arch(_dump("--dump-resource-usage"), "Function")
    if not any(arches.values()):
        _no_cuda_code("kernels._C holds no CUDA kernels (CPU-only build)")
    return arches


def test_every_kernel_is_built_for_every_arch(resources):
    for arch, funcs in resources.items():  # mangled names hold the kernel's own name
        for k in ATTENTION_MMA_KERNELS + ("_attn_bwd_delta_kernel", "_ln_fwd_kernel", "_ln_bwd_dx_kernel",
                                          "_ce_fwd_kernel", "_ce_bwd_kernel"):
            assert any(k in name for name in funcs), f"{arch}: no {k}"
    # what the library says it holds is what it holds, and CI's build covers Turing to Hopper
    assert _built_archs() == set(resources), f"kernels._C.cuda_archs={_C.cuda_archs!r}, the binary holds {sorted(resources)}"
    if _ci_build():
        assert CI_ARCHS <= set(resources), f"built for {sorted(resources)}, CI expects {sorted(CI_ARCHS)}"


def test_no_kernel_spills_or_overflows_static_shared_memory(resources):
    bad = []
    for arch, funcs in resources.items():
        for name, section in funcs.items():
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", section)
            assert m, f"{arch} {name}: no resource line in\n{section[:300]}"
            reg, stack, shared, local = map(int, m.groups())
            if stack or local:
                bad.append(f"{arch} {name}: {stack} B stack frame, {local} B local memory ({reg} registers): it spills")
            if shared > STATIC_SHARED_LIMIT:
                bad.append(f"{arch} {name}: {shared} B of static shared memory")
    assert not bad, "\n".join(bad)


def test_attention_kernels_use_the_tensor_cores():
    sass = _per_arch(_dump("--dump-sass"), "Function :")
    assert sass, "no SASS in kernels._C"
    for arch, funcs in sass.items():
        for kernel in ATTENTION_MMA_KERNELS:
            bodies = [body for name, body in funcs.items() if kernel in name]
            assert bodies, f"{arch}: {kernel} not found in the SASS"
            for body in bodies:
                if _sm(arch) >= 80:
                    assert re.search(r"\bHMMA\.", body), f"{arch}: {kernel} has no HMMA instruction"
                else:  # mma.sync.m16n8k16 needs sm_80: the body is the __trap() of LLM_ATTN_SM80 only
                    assert "BPT.TRAP" in body and not re.search(r"\bHMMA\.", body), f"{arch}: {kernel} is not the trap stub"
                    assert len(re.findall(r"/\*[0-9a-f]{4}\*/", body)) < 16, f"{arch}: {kernel} holds more than the trap"


ROPE_SWIGLU_KERNELS = ("_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel")  # csrc/rope_swiglu_cuda.cu


def test_rope_and_swiglu_kernels_are_built_for_every_arch(resources):
    """Each in its vector (16-byte) and scalar instantiations for float, half and bfloat16 (rope also
    forward and inverse): 3 dtypes x 2 widths (x 2 directions); the spill rule above covers them too."""
    for arch, funcs in resources.items():
        for k in ROPE_SWIGLU_KERNELS:
            found = [name for name in funcs if k in name]
            want = 12 if k == "_rope_kernel" else 6
            assert len(found) == want, f"{arch}: {len(found)} instantiations of {k}, expected {want}: {found}"


# csrc/rms_norm_cuda.cu: name -> instantiations.  The row kernels: (x, weight) in (float, float), (half, half),
# (half, float), (bf16, bf16), (bf16, float), each vector and scalar, with and without the residual (forward)
# or dsum (backward): 5 x 2 x 2; the dweight partials per x dtype, their reduction per weight dtype: 3 each.
RMS_NORM_KERNELS = {"_rms_fwd_kernel": 20, "_rms_bwd_dx_kernel": 20, "_rms_bwd_dw_partial_kernel": 3,
                    "_rms_bwd_dw_reduce_kernel": 3}


def test_rms_norm_kernels_are_built_for_every_arch(resources):
    """Every instantiation the launchers can pick is in the library for every arch (the spill and static
    shared-memory rules above cover them too)."""
    for arch, funcs in resources.items():
        for k, want in RMS_NORM_KERNELS.items():
            found = [name for name in funcs if k in name]
            assert len(found) == want, f"{arch}: {len(found)} instantiations of {k}, expected {want}: {found}"
