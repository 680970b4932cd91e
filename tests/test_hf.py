"""Hugging Face interop, both directions, against a small randomly initialised transformers GPT-2.

Nothing is downloaded: the reference model is built locally from a ``transformers.GPT2Config``.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llm.model import GPT, GPTConfig  # noqa: E402

V = 101


def hf_model(tie: bool) -> "transformers.GPT2LMHeadModel":
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=48, n_layer=2, n_head=4, tie_word_embeddings=tie,
        layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0; randomise everything so that a missed
    # bias, a wrong transpose or a swapped LayerNorm would show in the logits.
    randomize(model)
    return model


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            p.copy_(centre + 0.1 * torch.randn_like(p))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


IDX = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_ours(tmp_path, tie):
    ref = hf_model(tie)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.tie_weights == tie
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tie
    assert ours.config.block_size == 32 and ours.config.n_embd == 48 and ours.config.dropout == 0.0
    torch.testing.assert_close(our_logits(ours, IDX), hf_logits(ref, IDX), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_ours_to_hf(tmp_path, tie):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=48, tie_weights=tie)).eval()
    randomize(ours)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu_new"
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["tie_word_embeddings"] == tie
    ref, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()) == tie
    torch.testing.assert_close(hf_logits(ref.eval(), IDX), our_logits(ours, IDX), atol=1e-5, rtol=1e-5)
    # and back again
    again = GPT.from_pretrained(tmp_path)
    torch.testing.assert_close(our_logits(again, IDX), our_logits(ours, IDX), atol=0, rtol=0)


def test_bias_free_model_saves_as_zero_biases(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=48, bias=False)).eval()
    ours.save_pretrained(tmp_path)
    ref, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(hf_logits(ref.eval(), IDX), our_logits(ours, IDX), atol=1e-5, rtol=1e-5)


def test_old_style_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """The original hub "gpt2" upload: GPT2Model keys (no "transformer."), attn.bias buffers, a .bin file."""
    ref = hf_model(tie=True)
    ref.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    os.remove(tmp_path / "model.safetensors")
    torch.save(old, tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path)
    torch.testing.assert_close(our_logits(ours, IDX), hf_logits(ref, IDX), atol=1e-5, rtol=1e-5)


def test_from_pretrained_overrides(tmp_path):
    ref = hf_model(tie=True)
    ref.save_pretrained(tmp_path)
    short = GPT.from_pretrained(tmp_path, block_size=20, dropout=0.1, tie_weights=False)
    assert short.config.block_size == 20 and short.transformer.wpe.weight.shape == (20, 48)
    assert short.config.dropout == 0.1
    assert short.lm_head.weight.data_ptr() != short.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(our_logits(short, IDX), hf_logits(ref, IDX), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_positions=32"):
        GPT.from_pretrained(tmp_path, block_size=64)
    with pytest.raises(ValueError, match="n_layer"):
        GPT.from_pretrained(tmp_path, n_layer=3)
    with pytest.raises(ValueError, match="colour"):
        GPT.from_pretrained(tmp_path, colour=1)


def test_from_pretrained_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        GPT.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    hf_model(tie=True).save_pretrained(tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path / "noweights")

    # A hub name while offline: the error says the download failed and suggests a local directory.
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match=r"(?s)downloading it from the Hugging Face Hub failed.*local directory"):
        GPT.from_pretrained("gpt2")


def test_unsupported_checkpoint_variants(tmp_path):
    hf_model(tie=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in [("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True), ("n_inner", 100)]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=key):
            GPT.from_pretrained(tmp_path)
