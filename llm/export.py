"""``llm export hf|gguf CKPT OUT``: a training checkpoint as a Hugging Face folder or a llama.cpp GGUF file.

Why both: a Hugging Face folder (config.json, model.safetensors, generation_config.json and the
tokenizer files) loads with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and no code of
ours; a GGUF file is what llama.cpp, ollama and LM Studio run (and quantize) on a laptop.

* hf: the weights and config.json are :func:`llm.hf.save_pretrained` (GPT-2, Llama or Qwen3, chosen
  by the GPTConfig).  A checkpoint trained with tiktoken's GPT-2 BPE gets GPT-2's vocab.json +
  merges.txt, rebuilt from tiktoken's mergeable ranks (offline, from TIKTOKEN_CACHE_DIR); one trained
  with a tokenizer.json gets a copy of that file.
* gguf: written with llama.cpp's own ``gguf.GGUFWriter`` and tensor names, following what its
  ``convert_hf_to_gguf.py`` does to a Hugging Face checkpoint: GPT-2 (arch "gpt2") keeps our
  nn.Linear (out, in) weights -- the script transposes HF's Conv1D (in, out) into exactly that -- and
  always writes output.weight; Llama's q/k rows are permuted from the "rotate half" layout (ours and
  HF's) into the interleaved pairs llama.cpp's RoPE turns (``LlamaModel.permute``), and Llama 3's
  frequency scaling becomes a ``rope_freqs.weight`` tensor; Qwen3 uses llama.cpp's NEOX RoPE, which
  is rotate-half already, so its q/k are written as they are.  numpy's (out, in) is stored as GGML's
  ne = [in, out], which is what llama.cpp expects of a matrix.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .train.checkpoint import load_checkpoint, model_from_checkpoint
from .tokenizer import GPT2, EOT_TEXT, checkpoint_tokenizer, get_tokenizer

__all__ = ["add_export_args", "run_export", "export_hf", "export_gguf", "gpt2_vocab_and_merges"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_export_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face folder (safetensors, config.json, tokenizer files)",
                        description="a folder that transformers' AutoModelForCausalLM / AutoTokenizer load")
    gg = sub.add_parser("gguf", help="a llama.cpp GGUF file", description="one .gguf file for llama.cpp")
    for q, out_help in ((hf, "output folder"), (gg, "output .gguf file")):
        q.add_argument("checkpoint", metavar="CKPT", help="a training checkpoint (e.g. out/ckpt.pt)")
        q.add_argument("out", metavar="OUT", help=out_help)
        q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        q.add_argument("--dtype", choices=list(DTYPES), default="float32",
                       help="weight dtype (gguf: norms, biases and rope_freqs stay float32, as llama.cpp's "
                            "converter keeps them)")


def run_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        export_hf(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    elif args.format == "gguf":
        export_gguf(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    else:
        raise ValueError(f"unknown export format {args.format!r}: choose 'hf' or 'gguf'")
    print(f"wrote {args.out}")
    return 0


def _load(ckpt_path: str | os.PathLike, dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    ckpt = load_checkpoint(ckpt_path)
    return model_from_checkpoint(ckpt), checkpoint_tokenizer(ckpt)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or choose another OUT")


# ---------------------------------------------------------------------------------------------
# Hugging Face


def export_hf(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write a folder that ``transformers`` loads as is: weights, configs and the checkpoint's tokenizer."""
    from .hf import save_pretrained

    out = Path(out_dir)
    _check_out(out, overwrite)
    model, tok_name = _load(ckpt_path, dtype)
    tokenizer = get_tokenizer(tok_name)  # before writing anything: a missing tokenizer.json fails here
    if out.is_file():
        out.unlink()
    save_pretrained(model.to(DTYPES[dtype]), out)
    eos = tokenizer.eos_token_id
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=eos, eos_token_id=eos)  # the tokenizer's, not a guess from vocab_size
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": eos, "eos_token_id": eos, "do_sample": True, "temperature": 1.0,
                  "transformers_version": _transformers_version()}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tok_name == GPT2:
        _write_gpt2_tokenizer(out, model.config.block_size)
    else:
        _copy_tokenizer_json(Path(tokenizer.path if hasattr(tokenizer, "path") else tok_name), out)
    return out


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return "unknown"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (openai/gpt-2 encoder.py): the printable Latin-1 bytes stand
    for themselves and the other 68 (control chars, space, ...) are moved to U+0100 onwards, so that every
    token is a string without whitespace or control characters -- what vocab.json and merges.txt hold."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(keep, keep)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _bpe_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts BPE merges into ``token``: run the merges of lower rank over its bytes; two remain."""
    from .bpe import merge_parts

    parts = merge_parts(ranks, token, below=ranks[token])
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """GPT-2's encoder.json (token string -> id) and vocab.bpe merges ("a b", in rank order), rebuilt from
    tiktoken's mergeable ranks, which are cached offline; the merge of rank r makes the token of id r."""
    enc = get_tokenizer(GPT2)._enc
    ranks: dict[bytes, int] = enc._mergeable_ranks
    u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(u[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    for special, i in enc._special_tokens.items():
        vocab[special] = i
    merges = []
    for tok, _ in sorted(((t, r) for t, r in ranks.items() if len(t) > 1), key=lambda x: x[1]):
        a, b = _bpe_pair(ranks, tok)
        merges.append(f"{text(a)} {text(b)}")
    return vocab, merges


def _write_gpt2_tokenizer(out: Path, block_size: int) -> None:
    vocab, merges = gpt2_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
         "add_bos_token": False, "errors": "replace", **special}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _copy_tokenizer_json(src: Path, out: Path) -> None:
    from .hf_tokenizer import CONFIG_FILE, resolve_tokenizer_file

    file = resolve_tokenizer_file(src)
    shutil.copyfile(file, out / "tokenizer.json")
    config = file.parent / CONFIG_FILE
    if config.is_file():
        shutil.copyfile(config, out / "tokenizer_config.json")
    else:  # without one AutoTokenizer would guess from config.json's model_type (and add a BOS for llama)
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


# ---------------------------------------------------------------------------------------------
# GGUF


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rows of each head from rotate-half order (dim i pairs with
    i + D/2) to interleaved pairs (2i, 2i+1), the layout of Meta's checkpoints and llama.cpp's RoPE."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])  # (H, 2, D/2, ...)
            .swapaxes(1, 2)  # (H, D/2, 2, ...)
            .reshape(w.shape))


def llama3_rope_factors(head_dim: int, theta: float, s: dict) -> torch.Tensor:
    """rope_freqs.weight: by how much Llama 3's scaling divides each RoPE frequency (convert_hf_to_gguf's
    ``generate_extra_tensors``, same arithmetic)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(model) -> tuple[str, dict[str, torch.Tensor]]:
    """(llama.cpp arch name, {GGUF tensor name: fp32 tensor}) for our GPT, via the Hugging Face names
    that ``gguf.get_tensor_name_map`` knows (so the mapping is llm.hf's and llama.cpp's own)."""
    import gguf

    from . import hf, hf_llama

    cfg = model.config
    family = hf.hf_family(cfg)
    model = model.float()
    if family == "gpt2":
        _, hf_sd = hf._gpt2_hf_checkpoint(model, tied=False)  # zero biases where ours has none
        hf_sd = {k: (v.t() if k.endswith(hf._CONV1D) else v) for k, v in hf_sd.items()}  # Conv1D -> (out, in)
    else:
        hf_sd = hf_llama.hf_state_dict(model.state_dict(), cfg, tied=False)
    arch = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[family]
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    out = {}
    tied = model.lm_head.weight is model.transformer.wte.weight
    for key, t in hf_sd.items():
        if key == "lm_head.weight" and tied and family != "gpt2":
            continue  # llama.cpp reuses token_embd; its gpt2 converter writes output.weight always
        if family == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_permute(t, cfg.n_head)
        elif family == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_permute(t, cfg.n_kv_head)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no llama.cpp tensor name for {key!r} (arch {family})")
        out[name] = t.detach().float().contiguous()
    if family == "llama" and cfg.rope_scaling:
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return gguf.MODEL_ARCH_NAMES[arch], out


def gguf_vocab(tok_name: str, vocab_size: int) -> dict:
    """tokens, token types, merges and the end-of-text id, padded with [PAD<i>] to the model's vocab_size."""
    import gguf

    if tok_name == GPT2:
        vocab, merges = gpt2_vocab_and_merges()
        special, pre = {EOT_TEXT}, "gpt-2"
    else:
        from .hf_tokenizer import resolve_tokenizer_file

        spec = json.loads(resolve_tokenizer_file(tok_name).read_text(encoding="utf-8"))
        if spec.get("model", {}).get("type") != "BPE":
            raise ValueError(f"GGUF export supports BPE tokenizers; {tok_name} is {spec.get('model', {}).get('type')!r}")
        vocab = dict(spec["model"]["vocab"])
        for added in spec.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
        pre = "default"
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if tok is None else
                     gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL)
    eos = get_tokenizer(tok_name).eos_token_id
    return dict(tokens=tokens, types=types, merges=merges, eos=eos, pre=pre)


def export_gguf(ckpt_path: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "float32",
                overwrite: bool = False) -> Path:
    """Write one GGUF file llama.cpp runs: hyperparameters, tokenizer and tensors (see the module docstring)."""
    import gguf

    out = Path(out_file)
    _check_out(out, overwrite)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: gguf export writes one file (e.g. {out / 'model.gguf'})")
    model, tok_name = _load(ckpt_path, dtype)
    cfg = model.config
    arch, tensors = gguf_tensors(model)
    vocab = gguf_vocab(tok_name, cfg.vocab_size)
    qtype = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
             "bfloat16": gguf.GGMLQuantizationType.BF16}[dtype]
    ftype = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
             "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(Path(ckpt_path).parent.name or "llm")
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_file_type(ftype)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_vocab_size(cfg.vocab_size)
        if cfg.head_dim != cfg.n_embd // cfg.n_head:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        if vocab["eos"] is not None:
            w.add_bos_token_id(vocab["eos"])
            w.add_eos_token_id(vocab["eos"])
        w.add_add_bos_token(False)
        for name, t in tensors.items():
            data = t.numpy()
            if qtype == gguf.GGMLQuantizationType.F32 or data.ndim <= 1 or name.endswith("_norm.weight"):
                w.add_tensor(name, data.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, data.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
