"""llm.eval.multiple_choice: scoring with controlled log-probabilities, few-shot prompts, converters."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm.eval.multiple_choice import (
    evaluate_multiple_choice,
    fewshot_context,
    from_hellaswag,
    from_mmlu,
    load_items,
    score_choices,
)
from llm.model import GPT, GPTConfig

V = 128


class CharTokenizer:
    """One token per character (ASCII), 0 as end-of-text: token counts are character counts."""

    eot_token = 0

    def encode(self, text):
        return [ord(c) for c in text]


class UnigramModel(torch.nn.Module):
    """Every position predicts the same distribution: log p('a') = log 0.5, log p('b') = log 0.2,
    the rest share 0.3.  A choice's score is then a known sum, whatever the context."""

    def __init__(self, block_size=32):
        super().__init__()
        self.config = GPTConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        probs = torch.full((V,), 0.3 / (V - 2))
        probs[ord("a")], probs[ord("b")] = 0.5, 0.2
        self.logits = torch.nn.Parameter(probs.log())
        self.longest_input = 0

    def forward(self, idx, targets=None):
        assert idx.shape[1] <= self.config.block_size, "the evaluator must truncate to the block"
        self.longest_input = max(self.longest_input, idx.shape[1])
        return self.logits.expand(*idx.shape, V), None  # (B, T, V)


def test_acc_and_acc_norm_disagree_on_a_crafted_item():
    # "aaaa" sums to 4 log 0.5 = -2.77 (per character -0.69); "b" sums to log 0.2 = -1.61 (per character
    # -1.61): the raw sum prefers the short answer, the per-character score the long one.
    model, tok = UnigramModel(), CharTokenizer()
    scores = score_choices(model, tok, "Q:", ["aaaa", "b"])
    assert scores == pytest.approx([4 * math.log(0.5), math.log(0.2)], abs=1e-5)
    items = [{"context": "Q:", "choices": ["aaaa", "b"], "label": 0},
             {"context": "R:", "choices": ["aaaa", "b"], "label": 1},
             {"context": "S:", "choices": ["b", "ab"], "label": 1}]  # ab: -2.30 sum, -1.15 per char
    out = evaluate_multiple_choice(model, tok, items, progress=False)
    assert [r["pred"] for r in out["items"]] == [1, 1, 0]
    assert [r["pred_norm"] for r in out["items"]] == [0, 0, 1]
    assert out["metrics"] == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}
    assert evaluate_multiple_choice(model, tok, items, limit=1, progress=False)["metrics"]["n"] == 1


def test_scores_match_the_models_logits_and_long_contexts_are_cut_from_the_left():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = CharTokenizer()

    def direct(context, choice):  # the last block + 1 characters, choice tokens scored
        ids = torch.tensor(tok.encode(context + choice))[-17:]
        with torch.no_grad():
            logp = F.log_softmax(model(ids[None, :-1])[0][0].double(), dim=-1)  # (T, V)
        first = len(ids) - len(choice)  # position of the choice's first token
        return sum(logp[first - 1 + i, ids[first + i]].item() for i in range(len(choice)))

    for context in ["The cat sat", "A much longer context than the block of sixteen characters"]:
        got = score_choices(model, tok, context, [" on", " under the"])
        assert got == pytest.approx([direct(context, " on"), direct(context, " under the")], abs=1e-4)
    # The unigram model asserts that nothing longer than its block reaches it.
    short_block = UnigramModel(block_size=8)
    score_choices(short_block, tok, "x" * 50, ["aaa", "b"])
    assert short_block.longest_input == 8
    with pytest.raises(ValueError, match="longer than the model's block"):
        score_choices(short_block, tok, "ctx", ["a" * 9, "b"])


def test_fewshot_context_is_seeded_and_never_shows_the_item_itself():
    items = [{"context": f"Q{i}:", "choices": [" no", " yes"], "label": i % 2} for i in range(6)]
    ctx = fewshot_context(items, 2, n_shot=3, seed=7)
    assert ctx == fewshot_context(items, 2, n_shot=3, seed=7)
    examples, question = ctx.rsplit("\n\n", 1)[0].split("\n\n"), ctx.rsplit("\n\n", 1)[1]
    assert question == "Q2:" and len(examples) == 3 and "Q2:" not in examples
    for ex in examples:  # each solved with its own correct answer
        i = int(ex[1:ex.index(":")])
        assert ex == f"Q{i}:" + items[i]["choices"][items[i]["label"]]
    assert len({fewshot_context(items, 2, n_shot=3, seed=s) for s in range(10)}) > 1
    assert fewshot_context(items, 2, n_shot=0) == "Q2:"
    with pytest.raises(ValueError, match="6-shot needs 7 items"):
        fewshot_context(items, 0, n_shot=6)


def test_items_are_validated():
    model, tok = UnigramModel(), CharTokenizer()
    with pytest.raises(ValueError, match="item 1: label"):
        evaluate_multiple_choice(model, tok, [{"context": "a", "choices": ["x", "y"], "label": 1},
                                              {"context": "a", "choices": ["x", "y"], "label": 2}], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_multiple_choice(model, tok, [{"context": "a", "choices": ["x"], "label": 0}], progress=False)


def test_from_hellaswag():
    record = {"ind": 4, "activity_label": "Removing ice from car",
              "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman smiles.",
              "ctx_b": "then", "ctx": "unused when ctx_a is there",
              "endings": [", the man adds wax to the windshield and cuts it.", "[header] a person boards a ski lift.",
                          "the car is clean [title] Scrape the ice [step] more"],
              "label": "1"}
    item = from_hellaswag(record)
    assert item["context"] == ("Removing ice from car: Then, the man writes over the snow covering the window "
                               "of a car, and a woman smiles. Then")
    assert item["choices"] == [" , the man adds wax to the windshield and cuts it.", " a person boards a ski lift.",
                               " the car is clean. Scrape the ice more"]
    assert item["label"] == 1
    assert from_hellaswag({"ctx": "A dog runs", "endings": ["x", "y"], "label": 0})["context"] == "A dog runs"
    with pytest.raises(ValueError, match="no label"):
        from_hellaswag({**record, "label": ""})
    with pytest.raises(ValueError, match="endings"):
        from_hellaswag({"ctx": "a", "label": 0})


def test_from_mmlu_rows_and_dicts():
    want_context = "Question: What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    row = ["What is 2 + 2?", "3", "4", "5", "22", "B"]
    assert from_mmlu(row) == {"context": want_context, "choices": [" A", " B", " C", " D"], "label": 1}
    letters = {"question": "What is 2 + 2?", "A": "3", "B": "4", "C": "5", "D": "22", "answer": "b"}
    assert from_mmlu(letters) == from_mmlu(row)
    hf = from_mmlu({"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 3,
                    "subject": "elementary_mathematics"})
    assert hf["label"] == 3
    assert hf["context"] == ("The following are multiple choice questions (with answers) about elementary mathematics."
                             "\n\n" + want_context)
    with pytest.raises(ValueError, match="letter A-D"):
        from_mmlu(row[:5] + ["E"])
    with pytest.raises(ValueError, match="6 fields"):
        from_mmlu(row[:5])


def test_load_items_detects_the_format(tmp_path):
    (tmp_path / "astronomy_test.csv").write_text('"Which is a planet?",Sun,Mars,Moon,Comet,B\n')
    (items,) = load_items(tmp_path / "astronomy_test.csv")
    assert items["label"] == 1 and items["context"].startswith("The following are multiple choice questions "
                                                               "(with answers) about astronomy.")
    (tmp_path / "hs.jsonl").write_text(json.dumps({"ctx": "He", "endings": ["runs", "sits"], "label": 0}) + "\n")
    assert load_items(tmp_path / "hs.jsonl")[0]["choices"] == [" runs", " sits"]
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "1+1=", "choices": ["2", "3"], "label": 0}) + "\n\n")
    assert load_items(tmp_path / "mc.jsonl") == [{"context": "1+1=", "choices": ["2", "3"], "label": 0}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "x", "choices": ["2", "3"]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl, record 0"):
        load_items(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_items(tmp_path / "nope.jsonl")
