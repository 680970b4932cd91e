"""Evaluating a model: perplexity, multiple choice, GSM8K and HumanEval.

    perplexity.py       exp of the mean next-token loss, sliding windows for long texts
    multiple_choice.py  pick the most likely answer (HellaSwag/MMLU style): acc and acc_norm
    gsm8k.py            greedy (few-shot) generation, exact match of the final number
    humaneval.py        sample code, run its tests in the sandbox, unbiased pass@k
    sandbox.py          run untrusted Python in a limited, separate process
    common.py           JSONL reading, generation that stops at a string
    cli.py              ``llm eval <task>``: load a model, run a task, print and save the metrics

Import from the modules (``from llm.eval.perplexity import perplexity``).  This file imports
nothing, so that ``llm.cli`` can import ``llm.eval.cli`` without loading torch for ``llm --help``.
"""
