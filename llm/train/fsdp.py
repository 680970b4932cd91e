"""Fully sharded data parallelism for models that do not fit one GPU: ``llm pretrain --fsdp`` under torchrun.

    torchrun --standalone --nproc_per_node 8 -m llm pretrain --fsdp --preset gpt2-xl --data <shards>

PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``): every transformer block is one FSDP
unit and the rest of the model (embeddings, final norm, the tied head) the root unit, so each rank
holds 1/N of every weight, gradient and AdamW moment, and gathers one block's weights at a time
for its forward and backward.  Under bf16 the gathered weights are bf16 and gradients are reduced
in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), and a block's inputs are left as
they are (``cast_forward_inputs=False``: autocast runs the matmuls in bf16, and RoPE's cos/sin must stay
fp32); fp16 is refused (its loss scaler does not handle sharded gradients).

Checkpoints: the weights and the optimizer state are saved sharded with ``torch.distributed.checkpoint``
(DCP) into ``<out_dir>/ckpt_fsdp-<step>/``, every rank writing its own shards; DCP reshards on load,
so a run saved by 8 processes resumes on 1, 2 or 16.  ``ckpt.pt`` beside it holds the rest of the
state (step, RNG, data position, config), which shard folder goes with it, and the full weights
gathered on rank 0 -- so ``llm generate``, ``eval`` and ``export`` read an FSDP run like any other.
The shard folder is written under a temporary name and renamed once complete, ``ckpt.pt`` is
replaced atomically after it, and only then is the previous folder removed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from . import distributed

SHARDED_PREFIX = "ckpt_fsdp-"


def shard_model(model: torch.nn.Module, device: torch.device, precision_name: str) -> torch.nn.Module:
    """``fully_shard`` each block, then the root, in place; returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {}
    if precision_name == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Accumulation micro-steps before the last keep their gradients local (no reduce-scatter)."""
    model.set_requires_gradient_sync(sync)


def full_model_state(model: torch.nn.Module) -> dict:
    """The full (unsharded) weights on rank 0's CPU, {} on the other ranks; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: torch.nn.Module, optimizer, out_dir: Path, step: int, info: distributed.DistInfo) -> str:
    """DCP-save the sharded weights and optimizer state into ``ckpt_fsdp-<step>``; returns its name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"{SHARDED_PREFIX}{step:08d}"
    tmp = out_dir / f".{name}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk
    if info.is_main:
        shutil.rmtree(out_dir / name, ignore_errors=True)
        tmp.rename(out_dir / name)
    dist.barrier()
    return name


def load_sharded(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load a :func:`save_sharded` folder into the (already sharded) model and optimizer, whatever
    the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not folder.is_dir():
        from .checkpoint import CheckpointError

        raise CheckpointError(f"cannot resume: the sharded state {folder} that ckpt.pt names is missing")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def remove_old_sharded(out_dir: Path, keep: str) -> None:
    """Rank 0, once ``ckpt.pt`` names ``keep``: the shard folders of earlier checkpoints go."""
    for p in out_dir.glob(f"{SHARDED_PREFIX}*"):
        if p.name != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
