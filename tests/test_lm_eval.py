"""llm.eval.lm_eval_adapter: our GPT as an lm-evaluation-harness model, checked against our own evaluators.

A multiple-choice task defined locally (a JSONL of ``llm eval mc`` items and a YAML config) runs through
``lm_eval.simple_evaluate`` and must give the same acc, acc_norm and per-choice log-likelihoods as
``llm eval mc``; ``loglikelihood_rolling`` must give our perplexity's total log-likelihood, and
``generate_until`` our greedy generation cut at the stop string.  Nothing touches the network: the
dataset is a local JSON file (cached under tmp_path) and the harness's own task index is not built.
"""
import argparse
import copy
import json
import os
import sys

import pytest
import torch

for _flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # before datasets is imported (read at import)
    os.environ.setdefault(_flag, "1")

from llm.train.checkpoint import FORMAT  # noqa: E402
from llm.eval.cli import add_eval_args, run_eval  # noqa: E402
from llm.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from llm.eval.perplexity import perplexity  # noqa: E402
from llm.generate import generate_text  # noqa: E402
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.tokenizer import get_tokenizer  # noqa: E402

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from llm.eval.lm_eval_adapter import make_lm  # noqa: E402

BLOCK = 32
ITEMS = [
    {"context": "The cat sat on the", "choices": [" mat", " moon", " elephant in the room"], "label": 0},
    {"context": "Water is", "choices": [" wet", " dry as a bone in the desert"], "label": 1},
    {"context": "Two plus two is", "choices": [" four", " five", " a number", " 4"], "label": 3},
    {"context": "Paris is the capital of", "choices": [" France", " the moon"], "label": 0},
    # longer than the block with its choices: the context is cut from the left, the choice kept
    {"context": "Once upon a time, in a land far away, there lived a king who had three daughters, and "
                "the youngest of them was", "choices": [" kind", " very clever indeed", " tall"], "label": 1},
    {"context": "Q: Is the sky blue?\nA:", "choices": [" yes", " no"], "label": 0},
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # The GPT-2 vocabulary but a narrow model, so the 50257-wide head is cheap.
    return GPT(GPTConfig(vocab_size=50257, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def lm(model, tok):
    return make_lm(model, tok, batch_size=3, progress=False)


def _task(folder, items):
    """A JSONL of ``llm eval mc`` items and an lm-eval YAML task ``tiny_mc`` over it in ``folder``."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    # target_delimiter "": our choices carry their own leading space, so the continuation is the choice
    # as it is, and lm-eval's acc_norm (log-likelihood / len(choice)) is ours.
    (folder / "tiny_mc.yaml").write_text(f"""\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return data


def _eval(argv):
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    return run_eval(parser.parse_args(argv))


def _request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_cli_lm_eval_equals_llm_eval_mc(model, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": FORMAT, "step": 1, "model": model.state_dict(), "model_config": model.config.to_dict()},
               ckpt)
    data = _task(tmp_path, ITEMS)
    common = ["--checkpoint", str(ckpt), "--no-progress"]
    assert _eval(["lm-eval", "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--batch-size", "4",
                  "--out", str(tmp_path / "lm.json"), *common]) == 0
    table = capsys.readouterr().out
    assert "tiny_mc/acc" in table and "tiny_mc/acc_norm" in table
    assert _eval(["mc", str(data), "--out", str(tmp_path / "mc.json"), *common]) == 0
    theirs, ours = (json.loads((tmp_path / f).read_text()) for f in ("lm.json", "mc.json"))

    assert theirs["task"] == "lm-eval" and theirs["config"]["tasks"] == ["tiny_mc"]
    assert theirs["metrics"]["tiny_mc/acc"] == ours["metrics"]["acc"]
    assert theirs["metrics"]["tiny_mc/acc_norm"] == ours["metrics"]["acc_norm"]
    by_doc = {r["doc_id"]: r for r in theirs["items"]}
    assert sorted(by_doc) == list(range(len(ITEMS)))
    for mine in ours["items"]:
        scores = [ll for ll, _greedy in by_doc[mine["index"]]["resps"]]
        assert scores == pytest.approx(mine["logprobs"], abs=1e-5), mine["index"]
        assert by_doc[mine["index"]]["acc"] == float(mine["pred"] == mine["label"])
        assert by_doc[mine["index"]]["acc_norm"] == float(mine["pred_norm"] == mine["label"])
    # the crafted items make the two metrics differ somewhere, or the comparison would not test acc_norm
    assert any(m["pred"] != m["pred_norm"] for m in ours["items"])


def test_loglikelihood_matches_score_choices_and_reports_greedy(model, tok, lm):
    out = evaluate_multiple_choice(model, tok, ITEMS, progress=False)
    requests = [_request("loglikelihood", item["context"], c) for item in ITEMS for c in item["choices"]]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    assert got == pytest.approx([s for r in out["items"] for s in r["logprobs"]], abs=1e-5)

    # is_greedy: true exactly for the model's own greedy continuation
    prompt = "The weather today is"
    greedy = generate_text(model, tok, prompt, max_new_tokens=4, temperature=0.0, eos_token_id=None)[0]
    (ll, is_greedy), (_, other) = lm.loglikelihood([_request("loglikelihood", prompt, greedy),
                                                    _request("loglikelihood", prompt, " banana split")])
    assert is_greedy and not other and ll < 0
    # an empty context conditions on <|endoftext|>, as `llm eval mc` does
    (ll_empty, _), = lm.loglikelihood([_request("loglikelihood", "", "Hello world")])
    ids = [tok.eot_token] + tok.encode("Hello world")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)
    assert ll_empty == pytest.approx(float(logp[range(len(ids) - 1), ids[1:]].sum()), abs=1e-5)


def test_loglikelihood_rolling_equals_perplexity(model, tok, lm):
    text = open(os.path.join(os.path.dirname(__file__), "..", "llm", "eval", "perplexity.py")).read()[:2000]
    ids = tok.encode(text)[: 3 * BLOCK]  # whole windows: lm-eval's last window and ours then coincide
    doc = tok.decode(ids)
    assert tok.encode(doc) == ids
    short = "A short document, well inside one block."
    rolled = lm.loglikelihood_rolling([_request("loglikelihood_rolling", doc),
                                       _request("loglikelihood_rolling", short)])
    for text_ids, got in ((ids, rolled[0]), (tok.encode(short), rolled[1])):
        ref = perplexity(model, [tok.eot_token] + text_ids, block_size=BLOCK, batch_size=2, progress=False)
        assert ref["tokens"] == len(text_ids)
        assert got == pytest.approx(-ref["loss"] * ref["tokens"], rel=1e-5)


def test_generate_until_stops_at_the_stop_string_and_equals_greedy(model, tok):
    # A random tiny GPT repeats one token greedily; large position embeddings make each step differ,
    # so that a stop string can occur in the middle of the continuation.
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(50)
    lm = make_lm(model, tok, progress=False)
    prompt = "In the beginning"
    full = generate_text(model, tok, prompt, max_new_tokens=12, temperature=0.0)[0]
    new_ids = tok.encode(full)
    stop = tok.decode(new_ids[6:8])  # text the greedy continuation reaches in its middle
    expected = full[: full.find(stop)]
    assert 0 < len(expected) < len(full)
    got = lm.generate_until([
        _request("generate_until", prompt, {"until": [stop], "max_gen_toks": 12}),
        _request("generate_until", prompt, {"until": stop, "max_gen_toks": 12, "do_sample": False}),
        _request("generate_until", prompt, {"until": [], "max_gen_toks": 12}),
    ])
    assert got == [expected, expected, full]


def test_without_lm_eval_one_line_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    # The package is checked before the model is loaded (this checkpoint does not exist); llm.cli's
    # main() prints an ImportError as its one line.
    with pytest.raises(ImportError) as info:
        _eval(["lm-eval", "--tasks", "x", "--checkpoint", str(tmp_path / "none.pt")])
    assert "pip install lm-eval" in str(info.value) and "\n" not in str(info.value)


def test_errors_name_the_problem(lm, tmp_path):
    from llm.eval.lm_eval_adapter import run_lm_eval

    with pytest.raises(FileNotFoundError, match="--include-path"):
        run_lm_eval(lm.model, lm.tokenizer, ["tiny_mc"], include_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="longer than the model's block"):
        lm.loglikelihood([_request("loglikelihood", "x", " word" * (BLOCK + 1))])
