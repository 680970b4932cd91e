"""llm classify: data loading/balancing/splitting, last-token pooling, freezing, a short run, --predict."""
import argparse
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from llm.finetune import classify as C
from llm.finetune.classify_data import balance, encode_batch, label_names, load_labelled, split
from llm.data import corpora
from llm.model import GPT, GPTConfig

SMS = Path(corpora.data_dir()) / "SMSSpamCollection"
needs_sms = pytest.mark.skipif(not SMS.is_file(), reason="SMSSpamCollection not in LLM_DATA_DIR")


@needs_sms
def test_sms_balance_and_split_deterministic_and_disjoint():
    recs = load_labelled("sms-spam")
    assert len(recs) == 5574 and sum(lab == "spam" for _, lab in recs) == 747
    bal = balance(recs, seed=123)
    assert sum(lab == "spam" for _, lab in bal) == 747 and sum(lab == "ham" for _, lab in bal) == 747
    tr, va, te = split(bal, seed=123)
    assert (len(tr), len(va), len(te)) == (1045, 149, 300)
    assert split(balance(recs, seed=123), seed=123) == (tr, va, te)
    assert split(bal, seed=7)[0] != tr
    idx = lambda part: {id(r) for r in part}
    assert not (idx(tr) & idx(va)) and not (idx(tr) & idx(te)) and not (idx(va) & idx(te))
    assert len(tr) + len(va) + len(te) == len(bal)


def test_named_columns_tsv_csv_jsonl(tmp_path):
    rows = [{"msg": f"hello {i}", "y": "b" if i % 2 else "a"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("msg,y\n" + "".join(f"\"{r['msg']}, x\",{r['y']}\n" for r in rows))
    (tmp_path / "d.tsv").write_text("".join(f"{r['y']}\t{r['msg']}\n" for r in rows))
    j = load_labelled(str(tmp_path / "d.jsonl"), "msg", "y")
    c = load_labelled(str(tmp_path / "d.csv"), "msg", "y")
    t = load_labelled(str(tmp_path / "d.tsv"))
    assert j[1] == ("hello 1", "b") and c[1] == ("hello 1, x", "b") and t[1] == ("hello 1", "b")
    assert label_names(j) == ["a", "b"]
    with pytest.raises(ValueError, match="no column 'label'"):
        load_labelled(str(tmp_path / "d.jsonl"), "msg", "label")
    (tmp_path / "one.tsv").write_text("ham\thi\nham\tyo\n")
    with pytest.raises(ValueError, match="two or more"):
        load_labelled(str(tmp_path / "one.tsv"))
    with pytest.raises(FileNotFoundError):
        load_labelled(str(tmp_path / "missing.csv"))


def _tiny():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    return C.make_classifier(GPT(cfg), 3).eval()


def test_last_real_token_pooling_matches_unpadded():
    from llm.tokenizer import get_tokenizer

    model, tok = _tiny(), get_tokenizer("gpt2")
    texts = ["a short one", "this message is quite a bit longer than the first", "x"]
    ids, lengths = encode_batch(texts, tok, 32, C.PAD_ID)
    assert ids.shape[1] == int(lengths.max()) and (ids[2, 1:] == C.PAD_ID).all()
    pooled = C.class_logits(model, ids, lengths)
    for i, t in enumerate(texts):
        one = torch.tensor([tok.encode(t)])
        alone = C.class_logits(model, one, torch.tensor([one.shape[1]]))
        torch.testing.assert_close(pooled[i], alone[0], atol=1e-5, rtol=1e-5)
    final_pos = model(ids)[0][:, -1]  # what the book's final-position pooling gives: differs for padded rows
    assert not torch.allclose(final_pos[0], pooled[0])


@pytest.mark.parametrize("which", ["last-block", "all", "head"])
def test_trainable_freezes_exactly(which):
    model = _tiny()
    C.set_trainable(model, which)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    every = {n for n, _ in model.named_parameters()}
    head = {n for n in every if n.startswith("lm_head.")}
    assert head == {"lm_head.weight", "lm_head.bias"} and model.lm_head.weight.shape == (3, 32)
    expect = {"all": every, "head": head,
              "last-block": head | {n for n in every if n.startswith(("transformer.h.1.", "transformer.ln_f."))}}
    assert train == expect[which]
    assert model.lm_head.weight is not model.transformer.wte.weight
    with pytest.raises(ValueError, match="trainable must be one of"):
        C.set_trainable(model, "bad")


def _write_toy(path: Path, n=200):
    """Two classes told apart by their words, like spam/ham."""
    lines = []
    for i in range(n):
        if i % 2:
            lines.append(f"spam\tWIN a FREE prize now call 0800{i:04d} claim cash txt STOP")
        else:
            lines.append(f"ham\tok see you at home later, number {i} lol")
    path.write_text("\n".join(lines) + "\n")


def _args(**kw):
    p = argparse.ArgumentParser()
    C.add_classify_args(p)
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)


def test_short_run_beats_majority_and_predict(tmp_path, capsys):
    torch.set_num_threads(1)
    data = tmp_path / "toy.tsv"
    _write_toy(data)
    out = tmp_path / "run"
    cfg = C.config_from_args(C.ClassifyConfig, _args(preset="tiny", data=data, trainable="all", lr=1e-3, epochs=2,
                                                     eval_interval=0, out_dir=out, device="cpu", no_progress=True))
    res = C.classify(cfg)
    assert res["n_train"] == 140 and res["n_test"] == 40
    assert res["test_accuracy"] > res["majority_accuracy"] and res["test_accuracy"] >= 0.9
    for name in ("ckpt.pt", "metrics.jsonl", "loss.png", "accuracy.png"):
        assert (out / name).is_file()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r and "test_loss" in r for r in recs) and recs[-1]["final"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["kind"] == "classify" and ckpt["labels"] == ["ham", "spam"] and ckpt["num_classes"] == 2
    capsys.readouterr()
    assert C.run_classify(_args(checkpoint=out / "ckpt.pt", predict="WIN a FREE prize now call 08009999 claim cash txt STOP")) == 0
    line = capsys.readouterr().out.strip()
    assert line.split("\t")[0] == "spam" and "ham 0." in line


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="trainable must be one of"):
        C.ClassifyConfig(preset="tiny", trainable="bad").validate()
    with pytest.raises(ValueError, match="--predict needs --checkpoint"):
        C.run_classify(_args(predict="hi"))


def test_zip_member_download(tmp_path, monkeypatch):
    payload = b"ham\thello\nspam\tWIN\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme", "x")
        zf.writestr("SMSSpamCollection", payload)
    src = tmp_path / "src.zip"
    src.write_bytes(buf.getvalue())
    c = corpora.Corpus(name="z", url=src.as_uri(), sha256=hashlib.sha256(payload).hexdigest(),
                       filename="SMSSpamCollection", member="SMSSpamCollection")
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path / "data"))
    path = corpora._fetch(c, 5.0)
    assert path.read_bytes() == payload
