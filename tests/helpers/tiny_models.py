"""Builds small random-weight Hugging Face model folders (config, safetensors, tokenizer).

The weights are drawn with a wider spread than the usual init so that greedy decoding has
clear winners and comparisons with transformers are not decided by rounding.
"""
from __future__ import annotations

import functools
import os
import pathlib
import shutil

import torch
import transformers

from distserve.models.gguf_loader import load_gguf_tokenizer
from distserve.models.locate import find_default_gguf

VOCAB = 49152  # SmolLM2's tokenizer


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer, from its GGUF; or from a saved copy at $DISTSERVE_TEST_TOKENIZER,
    on a machine where the GGUF package cannot be installed (the lent GPU machine)."""
    saved = os.environ.get("DISTSERVE_TEST_TOKENIZER")
    if saved:
        return transformers.AutoTokenizer.from_pretrained(saved)
    return load_gguf_tokenizer(find_default_gguf())


def tiny_config(kind: str, **overrides):
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    elif kind == "qwen2":   # q/k/v with a bias, none on o
        cfg = transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    elif kind == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
            do_layer_norm_before=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_model(kind: str, out: pathlib.Path, tokenizer_dir: pathlib.Path,
                     seed: int = 0, **overrides) -> pathlib.Path:
    cfg = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
