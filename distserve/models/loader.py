"""Builds a model from a Hugging Face folder, a GGUF file, or the built-in default.

Weights are read tensor by tensor into a model created without memory (meta device), so
peak memory stays near one copy of the weights.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from distserve.models.locate import locate_model
from distserve.models.packed_linear import can_pack, fast_bf16, pack_linears
from distserve.models.registry import model_class
from distserve.models.sharding import Shard

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 where the device runs it fast: CUDA, and CPUs with native bf16 or
    with AVX2 and FMA, where our kernels widen bf16 weights and KV to float32 in registers
    (half the bytes of float32 per decode step); float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ModelSource:
    """Where a model comes from: its config dict, a weight iterator and its tokenizer."""

    name: str
    hf_config: dict
    path: pathlib.Path
    gguf: Any = None  # the loaded GGUFModel, for a GGUF file (read once: config, tensors, tokenizer)

    @property
    def is_gguf(self) -> bool:
        return self.gguf is not None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.is_gguf:
            yield from self.gguf.tensors.items()
            return
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.path}")
        from safetensors import safe_open
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)


def find_model(model: str | None) -> ModelSource:
    """Resolve a model argument: None = built-in SmolLM2, a .gguf file, or an HF folder."""
    name, path, is_gguf = locate_model(model)
    if is_gguf:
        from distserve.models.gguf_cache import load_gguf_cached
        gguf = load_gguf_cached(path)
        return ModelSource(name, gguf.config, path, gguf)
    return ModelSource(name, json.loads((path / "config.json").read_text()), path)


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device,
                shard: Shard | None = None) -> nn.Module:
    """The whole model, or one parallel worker's `shard` of it."""
    cls = model_class(source.hf_config.get("model_type", "<missing>"))
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(source.hf_config, shard)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        model.load_weights(source.weights())
    model.eval()
    if can_pack(dtype, device):
        pack_linears(model)
    log.info("loaded %s (%s) in %.1f s", source.name, dtype, time.perf_counter() - start)
    return model


def load_tokenizer_for(source: ModelSource) -> Any:
    if source.is_gguf:
        return source.gguf.tokenizer
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(source.path))
