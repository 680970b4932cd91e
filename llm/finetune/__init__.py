"""Fine-tuning a pretrained GPT: ``llm sft``, ``llm dpo`` and ``llm classify``.

    common.py        FinetuneConfig, the CLI flags, loading the start model, saving the result
    loop.py          the training loop they share: accumulation, schedule, --compile, torchrun, --resume
    sft.py           instruction fine-tuning (the book's chapter 7); instruct.py: the Alpaca format
    dpo.py           direct preference optimization
    classify.py      classification fine-tuning (the book's chapter 6); classify_data.py: its data
    lora.py          LoRA adapters: apply, merge, save alone
"""
