"""OPT (the paper's models): learned positions (offset 2), LayerNorm, ReLU MLP, biases.

Handles pre- and post-LayerNorm variants (do_layer_norm_before) and a word embedding
width different from the hidden size (project_in / project_out), as OPT-350M has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from distserve.models.attention import AttentionMetadata, paged_attention
from distserve.models.weights import load_weights

_POSITION_OFFSET = 2  # OPT reserves the first two position embeddings
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTArgs:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_positions: int
    word_embed_proj_dim: int
    pre_layer_norm: bool
    final_layer_norm: bool
    bias: bool
    layer_norm_affine: bool
    activation: str

    @classmethod
    def from_hf(cls, c: dict) -> "OPTArgs":
        act = c.get("activation_function", "relu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported OPT activation_function {act!r}")
        pre = c.get("do_layer_norm_before", True)
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], ffn_dim=c["ffn_dim"],
            num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            max_positions=c.get("max_position_embeddings", 2048),
            word_embed_proj_dim=c.get("word_embed_proj_dim") or c["hidden_size"],
            pre_layer_norm=pre,
            final_layer_norm=pre and not c.get("_remove_final_layer_norm", False),
            bias=c.get("enable_bias", True),
            layer_norm_affine=c.get("layer_norm_elementwise_affine", True),
            activation=act)


class OPTAttention(nn.Module):
    def __init__(self, a: OPTArgs) -> None:
        super().__init__()
        self.num_heads, self.head_dim = a.num_heads, a.hidden_size // a.num_heads
        self.qkv_proj = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=a.bias)
        self.out_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=a.bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, layer_cache, meta: AttentionMetadata):
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.qkv_proj(x).chunk(3, -1))
        o = paged_attention(q, k, v, layer_cache, meta, self.scale)
        return self.out_proj(o.reshape(x.shape[0], -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, a: OPTArgs) -> None:
        super().__init__()
        self.pre = a.pre_layer_norm
        self.act = _ACTIVATIONS[a.activation]
        self.self_attn = OPTAttention(a)
        self.self_attn_layer_norm = nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_affine)
        self.fc1 = nn.Linear(a.hidden_size, a.ffn_dim, bias=a.bias)
        self.fc2 = nn.Linear(a.ffn_dim, a.hidden_size, bias=a.bias)
        self.final_layer_norm = nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_affine)

    def forward(self, x, layer_cache, meta):
        h = self.self_attn_layer_norm(x) if self.pre else x
        x = x + self.self_attn(h, layer_cache, meta)
        if not self.pre:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre else self.final_layer_norm(x)


class OPTForCausalLM(nn.Module):
    def __init__(self, hf_config: dict) -> None:
        super().__init__()
        a = self.args = OPTArgs.from_hf(hf_config)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(a.max_positions + _POSITION_OFFSET, a.hidden_size)
        narrow = a.word_embed_proj_dim != a.hidden_size
        self.project_in = nn.Linear(a.word_embed_proj_dim, a.hidden_size, bias=False) if narrow else None
        self.project_out = nn.Linear(a.hidden_size, a.word_embed_proj_dim, bias=False) if narrow else None
        self.layers = nn.ModuleList(OPTDecoderLayer(a) for _ in range(a.num_layers))
        self.final_layer_norm = (nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_affine)
                                 if a.final_layer_norm else None)
        self.lm_head = nn.Linear(a.word_embed_proj_dim, a.vocab_size, bias=False)
        self.tie_weights()

    num_layers = property(lambda self: self.args.num_layers)
    num_kv_heads = property(lambda self: self.args.num_heads)
    head_dim = property(lambda self: self.args.hidden_size // self.args.num_heads)
    max_positions = property(lambda self: self.args.max_positions)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.embed_tokens.weight  # OPT always ties its output layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + _POSITION_OFFSET)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache[:, i], meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # in the model dtype: the sampler widens only when it must

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        h = self.args.hidden_size
        fused = {"q_proj": ("qkv_proj", 0, h), "k_proj": ("qkv_proj", h, h),
                 "v_proj": ("qkv_proj", 2 * h, h)}

        def normalise(name: str) -> str | None:
            name = name.removeprefix("model.").removeprefix("decoder.")
            return None if name == "lm_head.weight" else name

        load_weights(self, weights, normalise, fused)
