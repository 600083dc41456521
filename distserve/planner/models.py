"""Model architectures the planner knows, as a plain data table, plus any local config.json.

Only shapes live here (layers, widths, heads, vocabulary): enough to count weights, FLOPs and
KV bytes. Never loads weights, never imports torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str            # opt (ReLU MLP, biases, learned positions) | llama (SwiGLU, RMSNorm)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dtype_bytes: int = 2   # fp16 / bf16
    head_dim_: int | None = None       # when not hidden / heads (Qwen3: 128 at hidden 5120 / 64)
    qk_norm: bool = False              # Qwen3: an RMSNorm on each head's q and k
    sliding_window: int | None = None  # attention window (KV is still counted for the context)

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn
        if self.family == "opt":   # q, k, v, o and fc1, fc2 with biases; two LayerNorms
            return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        q = self.q_dim
        attn = h * (q + 2 * self.kv_dim) + q * h + (q + 2 * self.kv_dim if self.qkv_bias else 0)
        return attn + 3 * h * f + 2 * h + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        if self.family == "opt":
            embed += (self.max_positions + 2) * self.hidden + 2 * self.hidden
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.layers * self.layer_params + embed + head + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (the reference's 2 x layers x hidden x bytes
        when there is no grouped-query attention)."""
        return 2 * self.layers * self.kv_dim * self.dtype_bytes

    def flops_per_token(self) -> float:
        """Dense-GEMM FLOPs for one token through every layer (2 per multiply-add)."""
        return 2.0 * self.layers * self.layer_params

    def valid_tp(self, tp: int) -> bool:
        """TP splits the query heads and the KV heads (replicated when TP exceeds them)."""
        if tp < 1 or self.heads % tp:
            return False
        return self.kv_heads % tp == 0 or tp % self.kv_heads == 0

    def valid_pp(self, pp: int) -> bool:
        return pp >= 1 and self.layers % pp == 0

    @property
    def shape(self) -> tuple:
        """What makes two models the same for planning, whatever their names."""
        return (self.family, self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim,
                self.ffn, self.vocab)


def _opt(name, layers, hidden, heads):
    return ModelSpec(name, "opt", layers, hidden, heads, heads, 4 * hidden, 50272, 2048,
                     tie_embeddings=True, qkv_bias=True)


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, max_positions, tie=False, bias=False,
           head_dim=None, qk_norm=False, window=None):
    return ModelSpec(name, "llama", layers, hidden, heads, kv_heads, ffn, vocab, max_positions,
                     tie_embeddings=tie, qkv_bias=bias, head_dim_=head_dim, qk_norm=qk_norm,
                     sliding_window=window)


def _qwen3(name, layers, hidden, heads, ffn, tie=False):
    return _llama(name, layers, hidden, heads, 8, ffn, 151936, 40960, tie=tie, head_dim=128,
                  qk_norm=True)


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    _opt("facebook/opt-13b", 40, 5120, 40),
    _opt("facebook/opt-66b", 64, 9216, 72),
    _opt("facebook/opt-175b", 96, 12288, 96),
    _llama("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256, 131072),
    _llama("meta-llama/Llama-3.1-70B", 80, 8192, 64, 8, 28672, 128256, 131072),
    _llama("meta-llama/Llama-3.1-405B", 126, 16384, 128, 8, 53248, 128256, 131072),
    _llama("meta-llama/Llama-3.2-1B", 16, 2048, 32, 8, 8192, 128256, 131072, tie=True),
    _llama("meta-llama/Llama-3.2-3B", 28, 3072, 24, 8, 8192, 128256, 131072, tie=True),
    _llama("meta-llama/Llama-3.3-70B-Instruct", 80, 8192, 64, 8, 28672, 128256, 131072),
    _llama("mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000, 32768, window=4096),
    _llama("Qwen/Qwen2.5-7B", 28, 3584, 28, 4, 18944, 152064, 131072, bias=True),
    _llama("Qwen/Qwen2.5-32B", 64, 5120, 40, 8, 27648, 152064, 131072, bias=True),
    _llama("Qwen/Qwen2.5-72B", 80, 8192, 64, 8, 29568, 152064, 131072, bias=True),
    _qwen3("Qwen/Qwen3-0.6B", 28, 1024, 16, 3072, tie=True),
    _qwen3("Qwen/Qwen3-1.7B", 28, 2048, 16, 6144, tie=True),
    _qwen3("Qwen/Qwen3-4B", 36, 2560, 32, 9728, tie=True),
    _qwen3("Qwen/Qwen3-8B", 36, 4096, 32, 12288),
    _qwen3("Qwen/Qwen3-14B", 40, 5120, 40, 17408),
    _qwen3("Qwen/Qwen3-32B", 64, 5120, 64, 25600),
    _llama("HuggingFaceTB/SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, 8192, tie=True),
)}


BUILT_IN = "HuggingFaceTB/SmolLM2-135M"   # what `serve` runs with no model named (its GGUF)


def built_in_spec() -> ModelSpec:
    """The planner's spec of the model `distserve serve` runs when none is named."""
    return MODELS[BUILT_IN]


def model_key(name: str) -> str:
    """A model's name without organisation, case or "-hf": how names are compared."""
    return name.lower().rstrip("/").split("/")[-1].removesuffix("-hf")


_BY_KEY = {model_key(n): m for n, m in MODELS.items()}


def from_config_json(path: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (or the folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        c = json.load(f)
    kind = c.get("model_type", "")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    if kind == "opt":
        return ModelSpec(c.get("_name_or_path") or path, "opt", c["num_hidden_layers"], hidden, heads,
                         heads, c["ffn_dim"], c["vocab_size"], c["max_position_embeddings"],
                         tie_embeddings=True, qkv_bias=True)
    if "intermediate_size" not in c:
        raise ValueError(f"{path}: unsupported model_type {kind!r} (need an OPT or Llama-like config)")
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    return ModelSpec(c.get("_name_or_path") or path, "llama", c["num_hidden_layers"], hidden, heads,
                     c.get("num_key_value_heads", heads), c["intermediate_size"], c["vocab_size"],
                     c.get("max_position_embeddings", 2048),
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                     qkv_bias=bool(c.get("attention_bias", kind == "qwen2")),
                     head_dim_=c.get("head_dim") or None, qk_norm=kind.startswith("qwen3"),
                     sliding_window=window if isinstance(window, int) else None)


def get_model(name: str) -> ModelSpec:
    """By catalogue name (case-insensitive, with or without the organisation), or a path to a
    config.json or a model folder holding one."""
    if os.path.exists(name):
        return from_config_json(name)
    found = _BY_KEY.get(model_key(name))
    if found is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                         "(or give a path to a config.json)")
    return found
