"""The tiles the Triton attention kernels may be autotuned over, and the pruning that picks them.

A config is (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages).  Which configs are safe depends on
the dots' kind and the padded head dim BLOCK_D, so the lists below are per kernel, per kind and per
BLOCK_D, and the autotuner's ``early_config_prune`` hands it only the list for the launch at hand:

* ``16bit``: fp16/bf16 inputs, tensor-core dots (wgmma on sm_90 where a tile has 64+ rows, mma.sync on
  sm_80);
* ``tf32``: fp32 inputs with TF32 dots (``torch.backends.cuda.matmul.allow_tf32``): twice the shared
  memory and registers per tile;
* ``ieee``: fp32 inputs with IEEE fp32 dots, which run on the FMA units: only small tiles compile in
  reasonable time without spilling;
* decoding (Tq <= 16 queries, the forward only) takes 16-row query tiles: a 128-row tile would compute
  127 masked rows for each real one, and the first decoding step compiles only these few configs;
* grouped-query attention's dK/dV (each program loops over its k/v head's group of query heads) takes
  the dK/dV list less the few configs in ``GQA_DKDV_SKIP``.

The lists were chosen from what ``python -m kernels.aot --all-configs`` reports (shared memory,
registers, spills for every candidate on sm_80 and sm_90).  Every config listed compiles for both
archs within the arch's shared memory and without a single spilled register, and each list keeps one
config that fits the ~99 KB of the GPUs with less shared memory (RTX 30xx-50xx, A10, L4, L40):
tests/test_triton_compile.py proves all of it in CI, for triton 3.6 and 3.8, at the shapes it
compiles.  On a GPU the pruner also compiles each listed config for the launch at hand and drops the
ones that spill or do not fit that device (``fits_this_gpu``), so a head dim, GPU or triton version CI
has not seen cannot hand the autotuner a spilling config either.
"""
from __future__ import annotations

import warnings

import triton

# kernel -> kind -> BLOCK_D -> configs, best guesses first
_SMALL_D = (16, 32, 64)
TILES: dict[str, dict[str, dict[int, list[tuple[int, int, int, int]]]]] = {
    "fwd": {
        "16bit": {
            **dict.fromkeys((16, 32), [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]),
            64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
            128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 1)],
            256: [(64, 32, 8, 2), (64, 16, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
        },
        "tf32": {
            **dict.fromkeys(_SMALL_D, [(128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 1)]),
            128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (32, 32, 4, 1)],
            256: [(32, 32, 4, 2), (16, 32, 4, 1)],
        },
    },
    "dq": {
        "16bit": {
            **dict.fromkeys((16, 32), [(64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (32, 64, 4, 2), (32, 32, 4, 1)]),
            64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
            128: [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
            256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
        },
        "tf32": {
            **dict.fromkeys(_SMALL_D, [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)]),
            128: [(64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
            256: [(32, 32, 4, 2), (16, 32, 8, 1), (16, 32, 4, 1)],
        },
    },
    "dkdv": {  # here BLOCK_N (keys) is the tile's rows and BLOCK_M (queries) the streamed side
        "16bit": {
            **dict.fromkeys((16, 32), [(32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 1)]),
            64: [(64, 128, 8, 1), (32, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 1)],
            128: [(64, 64, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2), (16, 32, 4, 1)],
            256: [(16, 32, 4, 2), (16, 32, 4, 1)],
        },
        "tf32": {
            **dict.fromkeys(_SMALL_D, [(32, 128, 8, 2), (16, 64, 4, 2), (16, 32, 4, 1)]),
            128: [(64, 32, 4, 1), (32, 32, 4, 2), (16, 32, 4, 2)],
            256: [(32, 16, 4, 1), (16, 32, 8, 1), (16, 16, 4, 1)],
        },
        "ieee": {
            **dict.fromkeys(_SMALL_D, [(16, 32, 4, 1), (16, 16, 4, 1)]),
            128: [(16, 32, 8, 1), (16, 16, 4, 1)],
            256: [(16, 32, 8, 1), (16, 16, 4, 1)],
        },
    },
}
TILES["fwd"]["ieee"] = {
    **dict.fromkeys(_SMALL_D, [(32, 32, 4, 1), (16, 32, 4, 1)]),
    128: [(16, 32, 8, 1), (16, 16, 4, 1)],
    256: [(16, 32, 8, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
}
TILES["dq"]["ieee"] = {
    **dict.fromkeys(_SMALL_D, [(32, 16, 4, 1), (16, 32, 4, 1)]),
    128: [(16, 32, 8, 1), (16, 16, 4, 1)],
    256: [(16, 32, 8, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
}

# The dK/dV configs a grouped-query launch (GROUP > 1 query heads per k/v head: the kernel's GQA loop over
# the group, a few more live registers) does not use: under triton 3.6 these spill there (8-24 B; under
# 3.8 they compile cleanly, and the multi-head launch keeps them).  kind -> BLOCK_D -> configs.
GQA_DKDV_SKIP: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "tf32": {64: [(32, 128, 8, 2)], 128: [(16, 32, 4, 2)]},
    "ieee": {256: [(16, 16, 4, 1)]},
}

# the forward while decoding (Tq <= DECODE_MAX_TQ): 16-row query tiles
DECODE_TILES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "16bit": {**dict.fromkeys((16, 32), [(16, 128, 4, 2), (16, 64, 4, 2), (16, 32, 4, 1)]),
              64: [(16, 64, 4, 2), (16, 32, 4, 1)], 128: [(16, 128, 4, 2), (16, 64, 4, 2)],
              256: [(16, 64, 4, 2), (16, 32, 4, 1)]},
    "tf32": {**dict.fromkeys((16, 32, 64, 128), [(16, 128, 4, 2), (16, 64, 4, 2), (16, 32, 4, 1)]),
             256: [(16, 64, 4, 2), (16, 32, 4, 1)]},
    "ieee": {**dict.fromkeys(_SMALL_D, [(16, 32, 4, 1)]),
             128: [(16, 32, 8, 1), (16, 16, 4, 1)], 256: [(16, 32, 8, 1)]},
}
DECODE_MAX_TQ = 16

# No forward or dq tile has more query rows than this.  It bounds how far back a non-finite key or value
# can reach in the Triton kernels (see kernels/reference.py, causal_attention): a masked score's
# probability is 0 and 0 * nan is nan, so inside its diagonal tile position j can reach the rows down
# to j - (Tk - Tq) - MAX_BLOCK_M + 1, never further.
MAX_BLOCK_M = 128


def _key(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def configs(kernel: str) -> list[triton.Config]:
    """Every config any launch of ``kernel`` ("fwd", "dq", "dkdv") may use: what the autotuner is given."""
    tables = [TILES[kernel]] + ([DECODE_TILES] if kernel == "fwd" else [])
    keys = dict.fromkeys(c for t in tables for by_d in t.values() for cs in by_d.values() for c in cs)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in keys]


def kind(q, prec: str) -> str:
    """The kind of dot a launch makes: "16bit", "tf32" or "ieee"."""
    if q.element_size() <= 2:
        return "16bit"
    return "tf32" if prec == "tf32" else "ieee"


def pruner(kernel: str, tq_arg: str, jit_fn=None):
    """The ``early_config_prune`` for ``kernel``: the autotuner benchmarks only this launch's list, and
    on a GPU only those of its configs that fit this device (see ``fits_this_gpu``).  ``tq_arg`` names
    the launch's tuning bucket of Tq (the forward's decode switch); ``jit_fn`` is the kernel."""
    def prune(all_configs, nargs, **kwargs):
        k = kind(nargs["Q"], kwargs["PREC"])
        if kernel == "fwd" and nargs[tq_arg] <= DECODE_MAX_TQ:
            wanted = DECODE_TILES[k][kwargs["BLOCK_D"]]
        else:
            wanted = TILES[kernel][k][kwargs["BLOCK_D"]]
        if kernel == "dkdv" and kwargs.get("GQA"):
            skip = GQA_DKDV_SKIP.get(k, {}).get(kwargs["BLOCK_D"], [])
            wanted = [w for w in wanted if w not in skip]
        by_key = {_key(c): c for c in all_configs}
        keep = [by_key[w] for w in wanted]
        if jit_fn is not None and nargs["Q"].is_cuda:
            keep = fits_this_gpu(kernel, jit_fn, keep, nargs, kwargs)
        return keep
    return prune


_warned: set = set()


def fits_this_gpu(kernel: str, jit_fn, configs: list, nargs: dict, kwargs: dict) -> list:
    """The configs that, compiled for this launch on this GPU, neither spill registers nor exceed its
    shared memory: the real resource use decides, for any head dim, GPU and triton version, not only
    the ones CI checks.  Compiling here costs nothing extra (the autotuner would compile every config
    it benchmarks, and reuses these); if none fits, the last (smallest) is kept and the autotuner runs
    it as before."""
    from triton.runtime.autotuner import OutOfResources

    args = [nargs[name] for name in jit_fn.arg_names if name in nargs]
    good = []
    for c in configs:
        try:
            compiled = jit_fn.warmup(*args, grid=(1,), **kwargs, **c.all_kwargs())
            compiled._init_handles()
            spills = compiled.n_spills
        except OutOfResources as exc:
            spills, why = None, str(exc)
        except AttributeError:  # a triton without these internals: keep the list as it is
            return configs
        if spills == 0:
            good.append(c)
            continue
        key = (kernel, kwargs["BLOCK_D"], _key(c))
        if key not in _warned:
            _warned.add(key)
            what = f"spills {spills} B of registers" if spills is not None else f"does not fit ({why.strip()})"
            warnings.warn(f"kernels: the attention {kernel} tile {_key(c)} (BLOCK_D={kwargs['BLOCK_D']}) {what} "
                          "on this GPU: the autotuner skips it", stacklevel=2)
    return good or configs[-1:]
