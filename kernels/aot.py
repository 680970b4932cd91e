"""Ahead-of-time compile checks: every Triton kernel, for a GPU that is not here.

Triton compiles for any NVIDIA target without a GPU (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``), and the compiled kernel says what it will cost on the device:
shared memory (Triton's own ``metadata.shared``), registers and spills (the ``ptxas -v`` log), and
which instructions each ``tl.dot`` became (the TTGIR: ``ttng.warp_group_dot`` is Hopper's ``wgmma``,
``tt.dot`` with an ``#mma`` layout the Ampere ``mma.sync``).  So CI, which has no GPU, can prove that
every configuration the autotuner may pick fits the chip, does not spill, and uses its tensor cores.

How a case is checked, so that it is exactly what a real launch would compile:

1. **Capture.**  The registered ops of ``kernels/flash_attention.py``, ``fused_layernorm.py``,
   ``fused_cross_entropy.py`` and ``fused_rmsnorm.py`` (and ``fused_rope.py``, ``fused_swiglu.py``) run forward and backward (through autograd, as in training) on ``meta``
   tensors (shapes and strides, no memory), with every kernel object replaced by a recorder: each
   launch's grid, arguments and keyword arguments are kept.
2. **Prune.**  For an autotuned kernel, the autotuner's own ``prune_configs`` (our
   ``early_config_prune`` included) says which configs it would benchmark for those arguments.
3. **Bind and compile.**  The JIT's own binder (``create_function_from_signature`` for the target's
   backend) turns the arguments into the signature, constexprs and specializations (pointer and
   integer divisibility by 16, integers equal to 1) that a launch makes; ``_pack_args`` and
   ``triton.compile`` do the rest, exactly as ``JITFunction.run`` does on a GPU.
4. **Measure.**  Per compiled kernel: shared bytes, registers, spill stores/loads, every dot's shape,
   operand type and instruction, compile seconds; per launch the grid for every config (CUDA caps
   grid axes 1 and 2 at 65,535 blocks).

``violations(records)`` lists what breaks a rule: a compile error, shared memory over the arch's
opt-in limit, any spill, a grid axis over its cap, and on sm_90 an fp16/bf16 dot with M >= 64 that
did not become ``wgmma``.  ``tests/test_triton_compile.py`` runs this for sm_80 and sm_90 and asserts
that the list is empty.

    python -m kernels.aot --arch 80 90 --jobs 2 --json aot.json --md aot.md     # the report
    python -m kernels.aot --all-configs ...   # every config, unpruned: what the pruning tables rest on

This module reads Triton internals that are the same in triton 3.6 and 3.8 (``JITFunction.params``,
``_pack_args``, ``runtime.jit.create_function_from_signature``); it must run without
``TRITON_INTERPRET`` (the kernels must be JIT functions, not interpreted ones).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch

# Shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100/H200, A100.
SHARED_LIMIT = {90: 232_448, 80: 166_912}
# ...and on the GPUs with less of it (sm_86/89/120: RTX 30xx-50xx, A10, L4, L40): each launch must keep one
# config within this (checked on the sm_80 compile, whose shared-memory use they share).
SMALL_GPU_SHARED = 101_376
GRID_LIMIT = (2**31 - 1, 65_535, 65_535)
# sm_90 tensor-core rule: an fp16/bf16 dot whose M (rows of the result) is at least this uses wgmma.
WGMMA_MIN_M = 64

KERNEL_MODULES = ("kernels.flash_attention", "kernels.fused_layernorm", "kernels.fused_cross_entropy")
KERNEL_MODULES += ("kernels.fused_rmsnorm",)
KERNEL_MODULES += ("kernels.fused_rope", "kernels.fused_swiglu")


@dataclasses.dataclass
class Launch:
    """One kernel launch made by a host launcher: which kernel, its grid and its arguments."""

    case: str
    module: str
    name: str  # the kernel's global name in its module
    grid: object  # a tuple, or a function of the launch's meta-parameters (the autotuned ones)
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Case:
    """A named use of the ops whose launches are captured (e.g. attention fwd+bwd, T=1024, D=128, bf16)."""

    op: str
    name: str
    dtype: str
    run: Callable[[], None]
    patches: tuple = ()  # (module, attribute, value) set while the launchers run


# ---------------------------------------------------------------------------------------------- cases


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp32-tf32": torch.float32,
           "fp64": torch.float64}


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors]


def _attention(B: int, H: int, Tq: int, Tk: int, D: int, dtype: torch.dtype, backward: bool,
               H_kv: int | None = None) -> None:
    from . import flash_attention as fa

    H_kv = H if H_kv is None else H_kv  # fewer k/v heads than query heads: grouped-query attention
    q, k, v = _leaves(_meta(B, H, Tq, D, dtype=dtype), _meta(B, H_kv, Tk, D, dtype=dtype),
                      _meta(B, H_kv, Tk, D, dtype=dtype))
    with torch.set_grad_enabled(backward):
        o = fa.causal_attention(q, k, v)  # the registered op: what kernels.causal_attention runs
        if backward:
            o.backward(torch.empty_like(o))


def _layer_norm(M: int, C: int, dtype: torch.dtype, residual: bool) -> None:
    from . import fused_layernorm as fl

    x, r, w, b = _leaves(_meta(M, C, dtype=dtype), _meta(M, C, dtype=dtype), _meta(C, dtype=dtype), _meta(C, dtype=dtype))
    outs = fl.add_layer_norm(x, r, w, b) if residual else (fl.layer_norm(x, w, b),)
    torch.autograd.backward(outs, [torch.empty_like(t) for t in outs])


def _cross_entropy(N: int, V: int, C: int, dtype: torch.dtype) -> None:
    from . import fused_cross_entropy as fce

    targets = torch.empty(N, dtype=torch.int64, device="meta")
    (logits,) = _leaves(_meta(N, V, dtype=dtype))
    fce.cross_entropy(logits, targets).backward()  # the gradient is written in the forward
    with torch.no_grad():
        fce.cross_entropy(logits, targets)  # loss only
    hidden, weight = _leaves(_meta(N, C, dtype=dtype), _meta(V, C, dtype=dtype))
    fce.linear_cross_entropy(hidden, weight, targets).backward()  # the kernel in place on each chunk


def _rms_norm(M: int, C: int, dtype: torch.dtype, residual: bool, w_dtype: torch.dtype | None = None) -> None:
    from . import fused_rmsnorm as fr

    x, r, w = _leaves(_meta(M, C, dtype=dtype), _meta(M, C, dtype=dtype), _meta(C, dtype=w_dtype or dtype))
    outs = fr.add_rms_norm(x, r, w) if residual else (fr.rms_norm(x, w),)
    torch.autograd.backward(outs, [torch.empty_like(t) for t in outs])


def _rope(B: int, H: int, T: int, D: int, dtype: torch.dtype, backward: bool) -> None:
    from . import fused_rope as fro

    (qkv,) = _leaves(_meta(B, T, 3, H, D, dtype=dtype))
    x = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D): q, a view of the fused QKV projection, as the model passes it
    cos, sin = _meta(T, D // 2, dtype=torch.float32), _meta(T, D // 2, dtype=torch.float32)
    with torch.set_grad_enabled(backward):
        y = fro.rope(x, cos, sin)
        if backward:
            y.backward(torch.empty_like(y))


def _swiglu(M: int, I: int, dtype: torch.dtype, fused: bool) -> None:  # noqa: E741
    from . import fused_swiglu as fsw

    if fused:  # gate and up, the two halves of one (M, 2I) projection (row stride 2I), as the model passes them
        (h,) = _leaves(_meta(M, 2 * I, dtype=dtype))
        gate, up = h.chunk(2, dim=-1)
    else:  # contiguous: one flat row
        gate, up = _leaves(_meta(M, I, dtype=dtype), _meta(M, I, dtype=dtype))
    y = fsw.swiglu(gate, up)
    y.backward(torch.empty_like(y))


# Grouped-query attention cases, (H, H_kv): groups of 2, 4 and 8 query heads per k/v head (8 with one
# k/v head: multi-query).  The forward and dQ kernels do not specialize on the group, so these compile
# to the MHA cases' kernels; dK/dV compiles its GQA variant (constexpr GQA=True), one for all three.
GQA_HEADS = ((4, 2), (8, 2), (8, 1))


def default_cases(dtypes=("fp16", "bf16", "fp32", "fp32-tf32"), head_dims=(16, 32, 64, 80, 128, 192, 256),
                  widths=(768, 4096, 12288, 16384), vocab=50257) -> list[Case]:
    """The shapes CI proves: attention at T = 1024 (forward + backward) and Tq = 1 decoding for every
    head-dim bucket the API runs in Triton (D <= 256, padded to 16/32/64/128/256), the same with
    grouped-query k/v (``GQA_HEADS``: groups 2, 4, 8), a huge B*H decode;
    LayerNorm and add-LayerNorm, RMSNorm and add-RMSNorm (also with fp32 weights) at widths ``widths``;
    cross-entropy and linear-CE at the GPT-2 vocab; RoPE of a fused-QKV view at ``ROPE_HEAD_DIMS`` (and
    Tq = 1 decoding), SwiGLU on the fused projection's halves at ``SWIGLU_WIDTHS`` and flat.
    (float64, which runs in Triton only in LayerNorm up to 4096 wide, is left out of the defaults: its
    division is a ptxas subroutine whose stack frame shows as a 12-byte spill on sm_80 under triton 3.6;
    ``--dtypes fp64`` checks it.)"""
    cases = []
    tf32 = (("kernels.flash_attention", "_dot_precision", lambda q: "tf32"),)
    for dn in dtypes:
        dt = _DTYPES[dn]
        patches = tf32 if dn == "fp32-tf32" else ()
        for D in head_dims:
            cases.append(Case("attention", f"train T=1024 D={D}", dn,
                              lambda D=D, dt=dt: _attention(2, 2, 1024, 1024, D, dt, True), patches))
            cases.append(Case("attention", f"decode Tq=1 Tk=1024 D={D}", dn,
                              lambda D=D, dt=dt: _attention(2, 2, 1, 1024, D, dt, False), patches))
            for H, H_kv in GQA_HEADS:
                gqa = f"H={H} H_kv={H_kv}"
                cases.append(Case("attention", f"train {gqa} T=1024 D={D}", dn,
                                  lambda D=D, dt=dt, H=H, H_kv=H_kv: _attention(2, H, 1024, 1024, D, dt, True, H_kv),
                                  patches))
                cases.append(Case("attention", f"decode {gqa} Tq=1 Tk=1024 D={D}", dn,
                                  lambda D=D, dt=dt, H=H, H_kv=H_kv: _attention(2, H, 1, 1024, D, dt, False, H_kv),
                                  patches))
        if dn == "fp32-tf32":
            continue  # tf32 changes only the attention dots
        cases.append(Case("attention", "decode B*H=70000 Tq=1 Tk=64 D=64", dn,
                          lambda dt=dt: _attention(70_000, 1, 1, 64, 64, dt, False)))
        for C in widths:
            for res in (False, True):
                name = f"{'add_layer_norm' if res else 'layer_norm'} C={C}"
                cases.append(Case("layer_norm", name, dn, lambda C=C, res=res, dt=dt: _layer_norm(64, C, dt, res)))
        for C in widths:  # RMSNorm at the same widths, plus fp32 weights with 16-bit activations
            for res in (False, True):
                name = f"{'add_rms_norm' if res else 'rms_norm'} C={C}"
                cases.append(Case("rms_norm", name, dn, lambda C=C, res=res, dt=dt: _rms_norm(64, C, dt, res)))
                if dt != torch.float32:
                    cases.append(Case("rms_norm", f"{name} weight fp32", dn,
                                      lambda C=C, res=res, dt=dt: _rms_norm(64, C, dt, res, torch.float32)))
        cases.append(Case("cross_entropy", f"N=16 V={vocab}", dn, lambda dt=dt: _cross_entropy(16, vocab, 64, dt)))
        for D in ROPE_HEAD_DIMS:  # RoPE forward + backward of q viewed in the fused QKV projection, and decoding
            cases.append(Case("rope", f"train T=1024 D={D}", dn, lambda D=D, dt=dt: _rope(2, 4, 1024, D, dt, True)))
        cases.append(Case("rope", "decode B*H=256 T=1 D=128", dn, lambda dt=dt: _rope(8, 32, 1, 128, dt, False)))
        for I in SWIGLU_WIDTHS:  # noqa: E741  (SwiGLU on the halves of the fused projection, and flat)
            cases.append(Case("swiglu", f"fused M=1024 I={I}", dn, lambda I=I, dt=dt: _swiglu(1024, I, dt, True)))
        cases.append(Case("swiglu", "flat M=1024 I=3072", dn, lambda dt=dt: _swiglu(1024, 3072, dt, False)))
    return cases


ROPE_HEAD_DIMS = (64, 80, 128)  # GPT-2 small, an unpadded 80 (D/2 = 40), Llama / Qwen3
SWIGLU_WIDTHS = (1000, 2816, 3072)  # a ragged width, Llama-style 2816 = 16 * 176, a round one


# -------------------------------------------------------------------------------------------- capture


def _is_kernel(obj) -> bool:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, Autotuner))


def jit_function(obj):
    """The JITFunction under an Autotuner (or heuristics) wrapper."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def kernel_objects() -> dict[tuple[str, str], object]:
    """Every Triton kernel object defined in the kernel modules: {(module, global name): object}."""
    import importlib

    found = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for attr, obj in vars(mod).items():
            if _is_kernel(obj) and getattr(jit_function(obj), "__module__", mod_name) == mod_name:
                found[(mod_name, attr)] = obj
    if not found:
        raise RuntimeError("no Triton JIT kernels found: is TRITON_INTERPRET set? (the check needs compiled kernels)")
    return found


def launched_kernels() -> set[tuple[str, str]]:
    """The kernels that are launched, not only called from other kernels (helpers are inlined)."""
    objs = kernel_objects()
    sources = {key: jit_function(obj).src for key, obj in objs.items()}
    helpers = set()
    for key in objs:
        pattern = re.compile(rf"\b{re.escape(key[1])}\s*\(")
        if any(pattern.search(src) for other, src in sources.items() if other != key):
            helpers.add(key)
    return set(objs) - helpers


class _Recorder:
    def __init__(self, module: str, name: str, sink: list, case: str):
        self.module, self.name, self.sink, self.case = module, name, sink, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.case, self.module, self.name, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(case: str, sink: list) -> Iterator[None]:
    import importlib

    objs = kernel_objects()
    saved = []
    try:
        for (mod_name, attr) in objs:
            mod = importlib.import_module(mod_name)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, _Recorder(mod_name, attr, sink, case))
        yield
    finally:
        for mod, attr, obj in saved:
            setattr(mod, attr, obj)


def capture(case: Case) -> list[Launch]:
    """Run a case's host code on meta tensors and return the launches it made (nothing runs)."""
    import importlib

    sink: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for mod_name, attr, value in case.patches:
            stack.enter_context(mock.patch.object(importlib.import_module(mod_name), attr, value))
        stack.enter_context(_recording(f"{case.op}: {case.name} {case.dtype}", sink))
        case.run()
    return sink  # empty when the op sends such inputs to the reference (e.g. float64 rows past MAX_C_FP64)


# -------------------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class Job:
    """One (launch, config, arch) to compile."""

    case: str
    op: str
    dtype: str
    kernel: str
    arch: int
    config: dict  # the autotune config's kwargs + num_warps/num_stages, or the launch's own
    grid: tuple  # the largest blocks per axis over every launch that compiles to this kernel
    launch: Launch
    extra: dict
    cases: list = dataclasses.field(default_factory=list)  # every case whose launch compiles to this


def _configs(kernel_obj, launch: Launch, all_configs: bool) -> list[tuple[dict, dict]]:
    """[(meta-parameters added to the launch, description)] for each config the autotuner would try."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel_obj, Autotuner):
        keep = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages")}
        return [({}, keep)]
    if all_configs:
        configs = kernel_obj.configs
    else:
        kernel_obj.nargs = dict(zip(kernel_obj.arg_names, launch.args))
        try:
            configs = kernel_obj.prune_configs(dict(launch.kwargs))
        finally:
            kernel_obj.nargs = None
    out = []
    for c in configs:
        desc = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        out.append((c.all_kwargs(), desc))
    return out


def _grid(launch: Launch, meta: dict) -> tuple:
    if callable(launch.grid):
        names = jit_function(kernel_objects()[(launch.module, launch.name)]).arg_names
        return tuple(launch.grid({**dict(zip(names, launch.args)), **launch.kwargs, **meta}))
    return tuple(launch.grid)


def plan(cases: list[Case], archs=(90, 80), all_configs: bool = False) -> list[Job]:
    """Capture every case and expand it into compile jobs, one per (launch, surviving config, arch);
    identical compilations (same kernel, specialization and config) appear once, listing every case
    that makes them and the largest grid any of those launches asks for."""
    objs = kernel_objects()
    jobs: dict = {}
    for case in cases:
        for launch in capture(case):
            kobj = objs[(launch.module, launch.name)]
            for meta, desc in _configs(kobj, launch, all_configs):
                grid = _grid(launch, meta)
                for arch in archs:
                    key = (launch.name, arch, repr(_specialization_key(jit_function(kobj), launch, meta)))
                    job = jobs.setdefault(key, Job(launch.case, case.op, case.dtype, launch.name, arch, desc, grid,
                                                   launch, meta))
                    if launch.case not in job.cases:
                        job.cases.append(launch.case)
                    width = max(len(job.grid), len(grid))
                    pad = lambda g: tuple(g) + (1,) * (width - len(g))  # noqa: E731
                    job.grid = tuple(max(a, b) for a, b in zip(pad(job.grid), pad(grid)))
    return list(jobs.values())


def _specialization_key(fn, launch: Launch, meta: dict):
    """What decides the compiled code, as the binder sees it: a constexpr's value, a tensor's dtype, an
    integer's equality to 1 and divisibility by 16 (pointers here are all aligned; neither for an
    integer declared ``do_not_specialize``, no divisibility for ``do_not_specialize_on_alignment``);
    plus meta-params."""
    parts = []
    for param, a in zip(fn.params, launch.args):
        if param.is_constexpr:
            parts.append(("c", a))
        elif isinstance(a, torch.Tensor):
            parts.append(("t", str(a.dtype)))
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(("v", a if not isinstance(a, float) else "f"))
        else:
            specialize = not getattr(param, "do_not_specialize", False)
            align = specialize and not getattr(param, "do_not_specialize_on_alignment", False)
            parts.append(("i", specialize and a == 1, align and a % 16 == 0))
    return tuple(parts), tuple(sorted({**launch.kwargs, **meta}.items(), key=lambda kv: kv[0]))


_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*?:\s*(?:!ttg\.memdesc|tensor)<(\d+)x(\d+)x(\w+).*?"
                  r"->\s*tensor<(\d+)x(\d+)x(\w+),\s*#(\w+)")


def dots(ttgir: str) -> list[dict]:
    """Every dot in a TTGIR module: the instruction ("wgmma": Hopper's warp-group MMA; "mma": mma.sync
    tensor cores; "fma": no tensor cores, e.g. IEEE fp32), result M x N, operand and accumulator types."""
    out = []
    for line in ttgir.splitlines():
        m = _DOT.search(line)
        if m:
            op, _, _, a_ty, rm, rn, c_ty, layout = m.groups()
            kind = "wgmma" if op == "ttng.warp_group_dot" else ("mma" if layout.startswith("mma") else "fma")
            out.append({"op": kind, "M": int(rm), "N": int(rn), "a": a_ty, "acc": c_ty})
    return out


def _ptxas_numbers(log: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {"regs": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


def compile_job(job: Job) -> dict:
    """Compile one job for its arch; return the record (an ``error`` string instead when it fails)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(kernel_objects()[(job.launch.module, job.launch.name)])
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    kwargs = {**job.launch.kwargs, **job.extra}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run does
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    record = {"case": job.case, "cases": job.cases, "op": job.op, "dtype": job.dtype, "kernel": job.kernel,
              "arch": job.arch, "config": job.config, "grid": list(job.grid), "constexprs": {}}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*job.launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        record["constexprs"] = {fn.arg_names[path[0]]: val for path, val in constexprs.items()}
        with mock.patch.object(knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(log):
            kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as exc:  # noqa: BLE001  (the error is the result)
        record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        record["compile_s"] = round(time.perf_counter() - t0, 2)
        return record
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    try:
        record["shared"] = int(kernel.metadata.shared)
        record.update(_ptxas_numbers(log.getvalue()))
        if record["spill_stores"] is None:  # a cached kernel: ptxas did not run, so read the cubin instead
            record.update(_cubin_resources(kernel.asm["cubin"]))
        record["dots"] = dots(kernel.asm["ttgir"])
    except Exception as exc:  # noqa: BLE001  (e.g. a damaged cache entry: say so, keep the other records)
        record["error"] = f"could not read the compiled kernel: {type(exc).__name__}: {exc}"
    return record


def _cubin_resources(cubin: bytes) -> dict:
    """REG and STACK of a cubin (``cuobjdump --dump-resource-usage``): a spill shows as a stack frame."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    return {"regs": regs, "stack": stack, "spill_stores": stack, "spill_loads": stack}


def _compile_index(i: int) -> dict:
    return compile_job(_JOBS[i])


_JOBS: list[Job] = []


def run(jobs: list[Job], n_jobs: int = 1, progress: bool = False) -> list[dict]:
    """Compile every job (in ``n_jobs`` forked processes); records in job order."""
    global _JOBS
    _JOBS = jobs
    if n_jobs <= 1:
        return [compile_job(j) for j in jobs]
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    records = []
    with ctx.Pool(n_jobs) as pool:
        for i, rec in enumerate(pool.imap(_compile_index, range(len(jobs)), chunksize=1)):
            records.append(rec)
            if progress and (i + 1) % 50 == 0:
                print(f"  compiled {i + 1}/{len(jobs)}", file=sys.stderr, flush=True)
    return records


# --------------------------------------------------------------------------------------------- rules


def violations(records: list[dict]) -> list[str]:
    """Every broken rule, one line each (empty when all is well)."""
    bad = []
    for r in records:
        where = f"{r['kernel']} sm_{r['arch']} {r['case']} {r['config']}"
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        limit = SHARED_LIMIT.get(r["arch"])
        if limit is not None and r["shared"] > limit:
            bad.append(f"{where}: needs {r['shared']} B of shared memory, over sm_{r['arch']}'s {limit} B")
        if r.get("spill_stores") is None:
            bad.append(f"{where}: no ptxas report to read spills from")
        elif r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills ({r['spill_stores']} B stores, {r['spill_loads']} B loads, {r['regs']} registers)")
        for axis, (n, cap) in enumerate(zip(r["grid"], GRID_LIMIT)):
            if n > cap:
                bad.append(f"{where}: grid axis {axis} has {n} blocks, over CUDA's {cap}")
        if r["arch"] >= 90:
            for d in r["dots"]:
                if d["a"] in ("f16", "bf16") and d["M"] >= WGMMA_MIN_M and d["op"] != "wgmma":
                    bad.append(f"{where}: a {d['M']}x{d['N']} {d['a']} dot is {d['op']}, not wgmma")
    smallest: dict = {}
    for r in records:
        if r["arch"] == 80 and "error" not in r:
            for case in r.get("cases", [r["case"]]):
                key = (r["kernel"], case)
                smallest[key] = min(smallest.get(key, 1 << 30), r["shared"])
    for (kernel, case), shared in sorted(smallest.items()):
        if shared > SMALL_GPU_SHARED:
            bad.append(f"{kernel} [{case}]: no kept config fits {SMALL_GPU_SHARED} B of shared memory (smallest: {shared} B)")
    return bad


def markdown(records: list[dict], meta: dict) -> str:
    """The report: a summary per arch and kernel, the rule violations, then every compiled kernel."""
    from collections import defaultdict

    ok = [r for r in records if "error" not in r]
    lines = [f"# Triton kernels compiled ahead of time for {', '.join(f'sm_{a}' for a in meta['archs'])}", "",
             f"- triton {meta['triton']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}",
             f"- {len(records)} compilations (every autotune config the pruner keeps, at each case's launch "
             f"specialization), {meta['seconds']} s on {meta['jobs']} processes",
             f"- command: `python -m kernels.aot {meta['argv']}`", "",
             "| arch | kernel | compiled | max shared B | max regs | spill B | dots: wgmma / mma.sync / fma |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    groups = defaultdict(list)
    for r in ok:
        groups[(r["arch"], r["kernel"])].append(r)
    for (arch, kernel), rs in sorted(groups.items()):
        kinds = [d["op"] for r in rs for d in r["dots"]]
        lines.append(f"| sm_{arch} | {kernel} | {len(rs)} | {max(r['shared'] for r in rs)} | "
                     f"{max(r['regs'] or 0 for r in rs)} | {sum(r['spill_stores'] or 0 for r in rs)} | "
                     f"{kinds.count('wgmma')} / {kinds.count('mma')} / {kinds.count('fma')} |")
    bad = violations(records)
    lines += ["", f"## Violations: {len(bad)}", ""] + [f"- {b}" for b in bad]
    lines += ["", "## Every compiled kernel", "",
              "| arch | kernel | case | config | shared B | regs | spills B | dots | compile s |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for r in sorted(records, key=lambda r: (r["arch"], r["kernel"], r["case"], json.dumps(r["config"]))):
        cfg = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["config"].items())
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['case']} | {cfg} | | | | error: {r['error'][:80]} | |")
            continue
        counts: dict = {}
        for d in r["dots"]:
            label = f"{d['op']} {d['M']}x{d['N']} {d['a']}"
            counts[label] = counts.get(label, 0) + 1
        ds = ", ".join(f"{n}x {label}" if n > 1 else label for label, n in counts.items()) or "-"
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['case']} | {cfg} | {r['shared']} | {r['regs']} | "
                     f"{r['spill_stores']} | {ds} | {r['compile_s']} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 80 90")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32", "fp32-tf32"], choices=list(_DTYPES))
    p.add_argument("--head-dims", type=int, nargs="+", default=[16, 32, 64, 80, 128, 192, 256])
    p.add_argument("--widths", type=int, nargs="+", default=[768, 4096, 12288, 16384], help="LayerNorm and RMSNorm widths")
    p.add_argument("--op", nargs="+", default=None, help="only these ops (attention, layer_norm, rms_norm, cross_entropy, rope, swiglu)")
    p.add_argument("--all-configs", action="store_true", help="compile every autotune config, not only the kept ones")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--json", help="write every record here")
    p.add_argument("--md", help="write the resource table here (Markdown)")
    args = p.parse_args(argv)
    from triton import knobs

    if knobs.runtime.interpret:
        p.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    cases = default_cases(tuple(args.dtypes), tuple(args.head_dims), tuple(args.widths))
    if args.op:
        cases = [c for c in cases if c.op in args.op]
    t0 = time.perf_counter()
    jobs = plan(cases, tuple(args.arch), args.all_configs)
    print(f"{len(jobs)} compilations ({len(cases)} cases, sm_{'/sm_'.join(map(str, args.arch))}), "
          f"{args.jobs} processes", file=sys.stderr, flush=True)
    records = run(jobs, args.jobs, progress=True)
    import triton

    meta = {"triton": triton.__version__, "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
            "archs": args.arch, "launched_kernels": sorted(launched_kernels()), "jobs": args.jobs,
            "commit": _commit(), "date": time.strftime("%Y-%m-%d"), "argv": " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(records, meta))
    bad = violations(records)
    for line in bad:
        print(line)
    print(f"{len(records)} kernels compiled in {meta['seconds']} s; {len(bad)} violations", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
