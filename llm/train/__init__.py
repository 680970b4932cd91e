"""Pretraining (``llm pretrain``) and the machinery every training command shares.

    pretrain.py      the loop: TrainConfig, train(), resume (``from llm.train.pretrain import TrainConfig, train``)
    train_setup.py   device, precision (bf16 / fp16 with loss scaling), threads, seeds, kernels, model
    optim.py         AdamW with decay/no-decay groups, warmup + cosine schedule
    checkpoint.py    atomic checkpoints, safe loading, RNG state, the run lock
    distributed.py   torchrun: process group, all-reduce, rank 0 only
    train_log.py     metrics.jsonl and loss.png
    tracking.py      --logger: TensorBoard and wandb sinks
    flops.py         FLOPs per token, MFU, peak memory (bench/train.py uses them too)
    memory.py        the memory estimate a run checks before it starts

Fine-tuning (``llm/finetune/``) reuses all of these; nothing is imported here, so that importing one
module (e.g. ``llm.train.checkpoint`` from ``llm generate``) stays cheap.
"""
