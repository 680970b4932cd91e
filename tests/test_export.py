"""`llm export hf|gguf`: a tiny checkpoint of each architecture, read back by transformers and gguf.GGUFReader."""
import argparse
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from llm.train.checkpoint import FORMAT, CheckpointError, load_model  # noqa: E402
from llm.export import (add_export_args, export_gguf, export_hf, gguf_tensors, llama_permute,  # noqa: E402
                        run_export)
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.tokenizer import get_tokenizer  # noqa: E402

SMALL = dict(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=32)
ARCHS = {
    "gpt2": dict(SMALL),
    "llama": dict(SMALL, norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2,
                  intermediate_size=48, tie_weights=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16)),
    "qwen3": dict(SMALL, norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2, head_dim=16,
                  intermediate_size=48, qk_norm=True, norm_eps=1e-6, rope_theta=1e6),
}
TEXT = "Hello, world! <|endoftext|> ROMEO: wherefore art thou\n  spaces\ttabs 123 ünïcödé"


def make_ckpt(tmp_path, arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARCHS[arch]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(centre + 0.1 * torch.randn_like(p))
    path = tmp_path / arch / "ckpt.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict(),
                "tokenizer": "gpt2"}, path)
    return path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_export_loads_in_transformers(tmp_path, arch):
    ckpt = make_ckpt(tmp_path, arch)
    out = export_hf(ckpt, tmp_path / "hf")
    ours = load_model(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(idx)[0]
        got = theirs(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXT)["input_ids"] == get_tokenizer("gpt2").encode(TEXT)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256


def _reader_tensor(t):
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        data = gguf.quants.dequantize(data, t.tensor_type)
    return data.reshape([int(x) for x in reversed(t.shape)])


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("arch,dtype", [("gpt2", "float32"), ("llama", "float32"), ("qwen3", "float16")])
def test_gguf_export_reads_back(tmp_path, arch, dtype):
    ckpt = make_ckpt(tmp_path, arch)
    out = export_gguf(ckpt, tmp_path / "m.gguf", dtype=dtype)
    model = load_model(ckpt)
    cfg = model.config
    r = gguf.GGUFReader(out)
    want_arch, want = gguf_tensors(model)
    assert want_arch == arch and _field(r, "general.architecture") == arch
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want)
    for name, t in want.items():
        data = _reader_tensor(got[name])
        assert data.shape == tuple(t.shape), name
        if dtype == "float32" or t.ndim <= 1:
            np.testing.assert_array_equal(data, t.numpy(), err_msg=name)
        else:
            np.testing.assert_array_equal(data, t.numpy().astype(np.float16), err_msg=name)
    sd = model.state_dict()
    if arch == "gpt2":
        np.testing.assert_array_equal(_reader_tensor(got["blk.0.attn_qkv.weight"]),
                                      sd["transformer.h.0.attn.c_attn.weight"].numpy())  # (out, in), as nn.Linear
        np.testing.assert_array_equal(_reader_tensor(got["output.weight"]), sd["transformer.wte.weight"].numpy())
        assert "blk.0.attn_q.weight" not in got
    if arch == "llama":
        q = sd["transformer.h.1.attn.c_attn.weight"][: cfg.n_head * cfg.head_dim]
        np.testing.assert_array_equal(_reader_tensor(got["blk.1.attn_q.weight"]), llama_permute(q, cfg.n_head).numpy())
        # interleaved: llama.cpp's pair (0, 1) of head 0 is our rotate-half pair (0, D/2)
        np.testing.assert_array_equal(_reader_tensor(got["blk.1.attn_q.weight"])[1], q[cfg.head_dim // 2].numpy())
        assert "rope_freqs.weight" in got and got["rope_freqs.weight"].data.max() == 8.0
    if arch == "qwen3":
        assert "blk.0.attn_q_norm.weight" in got and "output.weight" not in got  # tied
        q = sd["transformer.h.0.attn.c_attn.weight"][: cfg.n_head * cfg.head_dim]
        np.testing.assert_array_equal(_reader_tensor(got["blk.0.attn_q.weight"]), q.numpy().astype(np.float16))
        assert _field(r, f"{arch}.attention.key_length") == 16 and _field(r, f"{arch}.attention.value_length") == 16
    meta = {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
            "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.n_head,
            "attention.head_count_kv": cfg.n_kv_head}
    for key, value in meta.items():
        assert _field(r, f"{arch}.{key}") == value, key
    if arch == "gpt2":
        assert _field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.norm_eps)
    else:
        assert _field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
        assert _field(r, f"{arch}.rope.freq_base") == cfg.rope_theta
        assert _field(r, f"{arch}.rope.dimension_count") == cfg.head_dim
    assert _field(r, "general.file_type") == (0 if dtype == "float32" else 1)
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and len(tokens) == cfg.vocab_size
    vocab = json.loads((export_hf(ckpt, tmp_path / "hf") / "vocab.json").read_text(encoding="utf-8"))
    assert tokens == sorted(vocab, key=vocab.get)
    assert tokens[15496] == "Hello" and tokens[50256] == "<|endoftext|>" and tokens[220] == "Ġ"
    assert len(_field(r, "tokenizer.ggml.merges")) == 50000
    assert _field(r, "tokenizer.ggml.eos_token_id") == 50256 and _field(r, "tokenizer.ggml.bos_token_id") == 50256


def _cli(*argv):
    # the export command's own parser: llm.cli's main() imports every command (some are not merged yet)
    parser = argparse.ArgumentParser(prog="llm export")
    add_export_args(parser)
    return run_export(parser.parse_args([str(a) for a in argv]))


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        _cli("gguf", tmp_path / "nope.pt", tmp_path / "x.gguf")
    ckpt = make_ckpt(tmp_path, "gpt2")
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _cli("gguf", ckpt, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"old"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _cli("hf", ckpt, tmp_path / "hf")
    with pytest.raises(SystemExit) as exc:
        _cli("onnx", ckpt, tmp_path / "y")
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown export format"):
        run_export(argparse.Namespace(format="onnx", checkpoint=ckpt, out=tmp_path / "y", dtype="float32",
                                      overwrite=False))
    assert _cli("gguf", ckpt, tmp_path / "x.gguf", "--overwrite", "--dtype", "bfloat16") == 0
    r = gguf.GGUFReader(tmp_path / "x.gguf")
    assert r.fields["general.architecture"].contents() == "gpt2" and r.fields["general.file_type"].contents() == 32
    wte = {t.name: t for t in r.tensors}["token_embd.weight"]
    assert wte.tensor_type == gguf.GGMLQuantizationType.BF16
    want = load_model(ckpt).transformer.wte.weight.detach()
    torch.testing.assert_close(torch.from_numpy(_reader_tensor(wte)), want.bfloat16().float(), rtol=0, atol=0)
