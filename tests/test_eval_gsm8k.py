"""llm.eval.gsm8k: answer extraction on the whole test set, prompts, scoring; stop strings."""
from decimal import Decimal

import pytest
import torch

from llm.eval import gsm8k
from llm.eval.common import generate_until, truncate_at_stops
from llm.eval.gsm8k import (
    build_prompt,
    evaluate_gsm8k,
    extract_answer,
    load_gsm8k,
    normalize_number,
    same_number,
)


@pytest.fixture(scope="module")
def records():
    return load_gsm8k()


def test_the_gold_number_of_every_test_answer_is_extracted(records):
    assert len(records) == 1319
    for r in records:
        raw = r["answer"].rsplit("####", 1)[1].strip()  # e.g. "18", "-3", "1,450,000"
        got = extract_answer(r["answer"])
        assert got is not None and Decimal(got) == Decimal(raw.replace(",", "")), (raw, got)


@pytest.mark.parametrize("text,want", [
    ("She makes 9 * 2 = $18 every day.", "18"),
    ("The total is 1,234,567 apples", "1234567"),
    ("He owes -42 dollars", "-42"),
    ("It costs $3.50.", "3.5"),
    ("So 10-5 = 5.", "5"),  # the minus of a subtraction is no sign
    ("The answer is 0.25 of 100. Then 7", "7"),
    ("#### 12\nBut later I said 99", "12"),  # the #### convention wins over the last number
    ("#### $1,000.", "1000"),
    ("Roughly .5 of it", "0.5"),
    ("1000.00", "1000"),
    ("no digits here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_numbers_compare_as_decimals():
    assert same_number(normalize_number("$1,000."), normalize_number("1000.0"))
    assert not same_number("1000", "1001")
    assert not same_number(None, "3")
    assert normalize_number("12,5x") is None


def test_prompt_format():
    shot = {"question": "What is 2+3? ", "answer": "2+3=<<2+3=5>>5\n#### 5"}
    q = {"question": "What is 4+4?", "answer": "#### 8"}
    assert build_prompt(q, [shot]) == "Question: What is 2+3?\nAnswer: 2+3=5\n#### 5\n\nQuestion: What is 4+4?\nAnswer:"
    assert build_prompt(q, []) == "Question: What is 4+4?\nAnswer:"


def test_scoring_and_few_shot_selection(monkeypatch):
    records = [{"question": f"q{i}", "answer": f"so it is {i * 10}\n#### {i * 10}"} for i in range(6)]
    prompts = []

    def fake_generate(model, tokenizer, prompt, **kwargs):
        prompts.append(prompt)
        assert kwargs["stops"] == ("\n\n", "Question:")
        i = int(prompt.rsplit("Question: q", 1)[1].split("\n")[0])
        # right for even questions (one with a comma and a dollar sign), wrong for odd ones
        return [f" it is ${i * 10:,}." if i % 2 == 0 else " I think 7"]

    monkeypatch.setattr(gsm8k, "generate_until", fake_generate)
    out = evaluate_gsm8k(None, None, records, n_shot=2, limit=4, progress=False)
    assert out["metrics"] == {"accuracy": 0.5, "correct": 2, "n": 4}
    assert [it["correct"] for it in out["items"]] == [True, False, True, False]
    assert out["items"][1]["prediction"] == "7" and out["items"][1]["gold"] == "10"
    # shots: the first two records other than the question itself
    shown = [[int(q.split("\n")[0]) for q in p.split("Question: q")[1:-1]] for p in prompts]
    assert shown == [[1, 2], [0, 2], [0, 1], [0, 1]]
    fixed = [{"question": "fixed", "answer": "#### 1"}]
    evaluate_gsm8k(None, None, records, n_shot=1, fewshot=fixed, limit=1, progress=False)
    assert prompts[-1].startswith("Question: fixed\nAnswer: #### 1\n\nQuestion: q0")
    with pytest.raises(ValueError, match="6-shot needs 7 records"):
        evaluate_gsm8k(None, None, records, n_shot=6, progress=False)


def test_generate_until_stops_at_the_first_stop_string():
    from llm.generate import generate_text
    from llm.model import GPT, GPTConfig
    from llm.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = get_tokenizer()
    prompt = "Question: what is one plus one?\nAnswer:"
    full = generate_text(model, tok, prompt, max_new_tokens=12, temperature=0)[0]  # greedy, no stops
    assert generate_until(model, tok, prompt, max_new_tokens=12) == [full]
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a string the greedy text is known to contain
    assert len(stop) == 3 and full.index(stop) > 0
    assert generate_until(model, tok, prompt, stops=["zzzz", stop], max_new_tokens=12) == [full[:full.index(stop)]]
    assert truncate_at_stops("a\n\nb Question: c", ["Question:", "\n\n"]) == "a"
