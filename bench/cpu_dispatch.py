"""What "auto" should run on this CPU: every op, forward + backward, on every CPU backend, by shape.

    python bench/cpu_dispatch.py                              # measure; results under bench/results/
    python bench/cpu_dispatch.py --write-table kernels/cpu_dispatch.json   # ... and the table auto reads
    python bench/cpu_dispatch.py --quick --write-table /tmp/t.json         # tiny grid (what CI runs)

For each op and each shape of the grid below (the shapes a GPT meets when it trains on a CPU: the
default ``cpu-small`` run, GPT-2 124M, at T = 64..256 and B = 4), the median wall-clock milliseconds
of one forward and backward on the "torch" reference, PyTorch's own ops ("pytorch") and the
extension's C++ CPU kernels ("cuda"), fp32, all in one run.  The table written with
``--write-table`` is what kernels/_cpu_dispatch.py reads: "auto" on the CPU then runs, per call, the
fastest available backend at the nearest measured shape.  A backend that cannot run here is recorded
as skipped with the reason and never chosen.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from bench.common import bench, environment, markdown_table, report_row, write_results  # noqa: E402
from kernels import _cpu_dispatch, backends  # noqa: E402

V = 50257
# (op, dims): cpu-small is C = 128, H = 4 (D = 32); GPT-2 124M is C = 768, H = 12 (D = 64); llama-tiny /
# qwen3-tiny are C = 128 with SwiGLU widths of a few hundred, Llama 3.2 1B C = 2048, I = 8192, D = 64; B = 4.
GRID = [
    ("linear_cross_entropy", dict(N=N, C=C, V=V)) for N in (256, 512, 1024) for C in (64, 128, 256, 768)
] + [
    ("cross_entropy", dict(N=N, V=V)) for N in (256, 1024)
] + [
    ("causal_attention", dict(BH=BH, T=T, D=D)) for BH, D in ((16, 32), (48, 64)) for T in (64, 128, 256)
] + [
    (op, dict(M=M, C=C)) for op in ("layer_norm", "add_layer_norm") for M in (256, 512, 1024) for C in (128, 768)
] + [
    (op, dict(M=M, C=C)) for op in ("rms_norm", "add_rms_norm") for M in (256, 1024) for C in (128, 768, 2048)
] + [
    ("rope", dict(BH=BH, T=T, D=D)) for BH, D in ((8, 32), (16, 64), (48, 64)) for T in (64, 256)
] + [
    ("swiglu", dict(M=M, C=C)) for M in (256, 1024) for C in (352, 3072, 8192)
]
QUICK_GRID = [
    ("linear_cross_entropy", dict(N=32, C=16, V=1000)),
    ("cross_entropy", dict(N=32, V=1000)),
    ("causal_attention", dict(BH=4, T=16, D=8)),
    ("layer_norm", dict(M=32, C=16)),
    ("add_layer_norm", dict(M=32, C=16)),
    ("rms_norm", dict(M=32, C=16)),
    ("add_rms_norm", dict(M=32, C=16)),
    ("rope", dict(BH=4, T=16, D=8)),
    ("swiglu", dict(M=32, C=24)),
]


def make_call(op: str, dims: dict[str, int], g: torch.Generator):
    """(inputs needing grad, a function of them returning a scalar to backprop)."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    if op == "linear_cross_entropy":
        h, w = rand(dims["N"], dims["C"]), rand(dims["V"], dims["C"], scale=0.02)
        t = torch.randint(0, dims["V"], (dims["N"],), generator=g)
        return (h, w), lambda h, w: kernels.linear_cross_entropy(h, w, t)
    if op == "cross_entropy":
        z = rand(dims["N"], dims["V"])
        t = torch.randint(0, dims["V"], (dims["N"],), generator=g)
        return (z,), lambda z: kernels.cross_entropy(z, t)
    if op == "causal_attention":
        q, k, v = (rand(1, dims["BH"], dims["T"], dims["D"]) for _ in range(3))
        return (q, k, v), lambda q, k, v: kernels.causal_attention(q, k, v).square().mean()
    if op == "rope":
        x = rand(1, dims["BH"], dims["T"], dims["D"])
        angle = torch.rand(dims["T"], dims["D"] // 2, generator=g) * 6.3
        return (x,), lambda x: kernels.rope(x, angle.cos(), angle.sin()).square().mean()
    if op == "swiglu":
        gate, up = rand(dims["M"], dims["C"]), rand(dims["M"], dims["C"])
        return (gate, up), lambda gate, up: kernels.swiglu(gate, up).square().mean()
    if op in ("rms_norm", "add_rms_norm"):
        x, w, r = rand(dims["M"], dims["C"]), rand(dims["C"]), rand(dims["M"], dims["C"])
        if op == "rms_norm":
            return (x, w), lambda x, w: kernels.rms_norm(x, w).square().mean()
        return (x, r, w), lambda x, r, w: sum(o.square().mean() for o in kernels.add_rms_norm(x, r, w))
    x, w, b = rand(dims["M"], dims["C"]), rand(dims["C"]), rand(dims["C"])
    if op == "layer_norm":
        return (x, w, b), lambda x, w, b: kernels.layer_norm(x, w, b).square().mean()
    r = rand(dims["M"], dims["C"])
    return (x, r, w, b), lambda x, r, w, b: sum(o.square().mean() for o in kernels.add_layer_norm(x, r, w, b))


def time_op(op: str, dims: dict[str, int], backend: str, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    inputs, fn = make_call(op, dims, g)

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward()

    with kernels.backend(backend):
        return bench(step, device=torch.device("cpu"), warmup=2, reps=reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid, 3 repetitions (a smoke run)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per shape (default 7; quick: 3)")
    p.add_argument("--write-table", type=Path, default=None, help="also write the dispatch table auto reads")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    from llm.train import train_setup

    train_setup.keep_freed_memory()  # as llm pretrain does on a CPU

    env = environment()
    cpu = torch.device("cpu")
    env.update(dtype="fp32", reps=f"2 warm-up + {reps} timed, median", measured="forward + backward of one call")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    rows, table_ops = [], {}
    for op, dims in QUICK_GRID if args.quick else GRID:
        row = {"op": op, "shape": " ".join(f"{k}={v}" for k, v in dims.items())}
        ms = {}
        for backend in _cpu_dispatch.CANDIDATES:
            reason = backends.unavailable_reason(backend, op, cpu)
            if reason:
                row[backend], ms[backend] = "-", f"skipped: {reason}"
                continue
            ms[backend] = row[backend] = time_op(op, dims, backend, reps)
        timed = {b: t for b, t in ms.items() if isinstance(t, float)}
        row["fastest"] = min(timed, key=timed.get)
        row["vs_torch"] = timed["torch"] / timed[row["fastest"]]
        report_row(rows, row)
        table_ops.setdefault(op, []).append({"shape": dims, "ms": ms})
    columns = ["op", "shape", *_cpu_dispatch.CANDIDATES, "fastest", "vs_torch"]
    print(markdown_table(rows, columns))
    stem = write_results("cpu_dispatch", rows, columns, env, args.out)
    print(f"wrote {stem}.csv, .md")
    if args.write_table:
        table = {"format": _cpu_dispatch.FORMAT, "machine": env["device"], "date": env["date"], "commit": env["commit"],
                 "torch": env["torch"], "measured_by": "bench/cpu_dispatch.py", "ops": table_ops}
        args.write_table.write_text(json.dumps(table, indent=1) + "\n")
        _cpu_dispatch.Table.load(args.write_table)  # it must read back
        print(f"wrote {args.write_table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
