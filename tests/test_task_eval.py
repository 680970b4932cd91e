"""--eval-task while pretraining (llm/train/task_eval.py): the logged accuracy is llm eval mc's on the
same model; bad specs are named.  (Split over ranks: tests/test_ddp.py.)"""
import json

import pytest

from llm.eval.multiple_choice import evaluate_multiple_choice, load_items
from llm.tokenizer import get_tokenizer
from llm.train.checkpoint import load_model
from llm.train.pretrain import TrainConfig, train
from llm.train.train_log import read_metrics


def test_the_logged_accuracy_is_llm_eval_mc_on_the_same_model(tmp_path):
    items = tmp_path / "hellaswag.jsonl"  # HellaSwag's own format
    with open(items, "w") as f:
        for i in range(12):
            f.write(json.dumps({"ctx_a": f"The man picks up {i} stones.", "ctx_b": "he", "activity_label": "Rocks",
                                "endings": ["throws them.", "eats a cloud.", "sings to them.", "is a river."],
                                "label": i % 4}) + "\n")
    out = tmp_path / "run"
    train(TrainConfig(preset="tiny", data="the-verdict", block_size=32, max_steps=4, eval_interval=2, eval_iters=1,
                      sample_tokens=0, device="cpu", progress=False, out_dir=str(out), eval_task=f"mc:{items}",
                      eval_task_limit=10))
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "mc_acc" in r]
    assert [(r["step"], r["mc_items"]) for r in logged] == [(0, 10), (2, 10), (4, 10)]  # with each val loss
    direct = evaluate_multiple_choice(load_model(out / "ckpt.pt"), get_tokenizer("gpt2"), load_items(items)[:10],
                                      progress=False)["metrics"]
    assert logged[-1]["mc_acc"] == pytest.approx(direct["acc"]) and logged[-1]["mc_acc_norm"] == pytest.approx(direct["acc_norm"])


def test_bad_eval_task_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="KIND:FILE"):
        TrainConfig(eval_task="hellaswag.jsonl").validate()
    with pytest.raises(FileNotFoundError, match="no such file"):
        TrainConfig(eval_task=f"mc:{tmp_path / 'missing.jsonl'}").validate()
    with pytest.raises(ValueError, match="eval_task_limit"):
        TrainConfig(eval_task_limit=0).validate()
