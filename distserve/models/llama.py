"""The Llama family: Llama 2/3 (rope scaling), Mistral, Qwen2 (qkv bias), SmolLM2.

Q/K/V and gate/up projections are fused into one matmul each; `load_weights` takes
Hugging Face parameter names and fuses them on the way in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from distserve.models import fused
from distserve.models.attention import AttentionMetadata, paged_attention
from distserve.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from distserve.models.weights import load_weights


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    qkv_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, c: dict) -> "LlamaArgs":
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r} for {c.get('model_type')}")
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta", 10000.0),
            rope_scaling=c.get("rope_scaling"),
            max_positions=c.get("max_position_embeddings", 4096),
            qkv_bias=c.get("attention_bias", c.get("model_type") == "qwen2"),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size, self.kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=False)
        self.scale = a.head_dim ** -0.5

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], layer_cache,
                meta: AttentionMetadata):
        heads = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if fused.rotary_cache_write(heads, *rope, layer_cache, meta.slot_blocks, meta.slot_offsets,
                                    self.num_heads):
            q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
            o = paged_attention(q, k, v, layer_cache, meta, self.scale, cache_written=True)
            return self.o_proj(o.reshape(-1, self.q_size))
        qk_heads = self.num_heads + self.num_kv_heads  # q and k are adjacent: rotate both at once
        q, k = apply_rotary(heads[:, :qk_heads], *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        o = paged_attention(q, k, heads[:, qk_heads:], layer_cache, meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = LlamaAttention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = LlamaMLP(a)

    def forward(self, x, residual, rope, layer_cache, meta):
        """(this layer's output, the residual stream before it is added): adding it is left
        to the next norm, which fuses the add (vLLM's layout)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, layer_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config: dict) -> None:
        super().__init__()
        a = self.args = LlamaArgs.from_hf(hf_config)
        self.rotary = RotaryEmbedding(a.head_dim, a.max_positions, a.rope_theta, a.rope_scaling)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.tie_weights()

    # -- what the engine needs to know to size the KV cache
    num_layers = property(lambda self: self.args.num_layers)
    num_kv_heads = property(lambda self: self.args.num_kv_heads)
    head_dim = property(lambda self: self.args.head_dim)
    max_positions = property(lambda self: self.args.max_positions)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, kv_cache[:, i], meta)
        return self.norm(x, residual)[0] if residual is not None else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # in the model dtype: the sampler widens only when it must

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up."""
        a = self.args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        fused = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv),
                 "v_proj": ("qkv_proj", q + kv, kv),
                 "gate_proj": ("gate_up_proj", 0, a.intermediate_size),
                 "up_proj": ("gate_up_proj", a.intermediate_size, a.intermediate_size)}

        def normalise(name: str) -> str | None:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (a.tie_word_embeddings and name == "lm_head.weight"):
                return None
            return name

        load_weights(self, weights, normalise, fused)
