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
from distserve.models.sharding import ModelDims, Shard, make_shard, no_reduce, shard_weights
from distserve.models.weights import load_weights

_POSITION_OFFSET = 2  # OPT reserves the first two position embeddings
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
# how tensor parallelism cuts each checkpoint weight (see sharding.py); the LM head is tied
TP_CUTS = {"q_proj": (0, "heads"), "k_proj": (0, "heads"), "v_proj": (0, "heads"),
           "out_proj": (1, "heads"), "fc1": (0, "ffn"), "fc2": (1, "ffn")}


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
    def __init__(self, a: OPTArgs, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, a.hidden_size // a.num_heads
        width = num_heads * self.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, 3 * width, bias=a.bias)
        self.out_proj = nn.Linear(width, a.hidden_size, bias=a.bias)
        self.scale = self.head_dim ** -0.5
        self.tp_reduce = no_reduce   # the sum over tensor-parallel workers, set by the executor

    def forward(self, x, layer_cache, meta: AttentionMetadata):
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.qkv_proj(x).chunk(3, -1))
        o = paged_attention(q, k, v, layer_cache, meta, self.scale)
        return self.tp_reduce(self.out_proj(o.reshape(x.shape[0], -1)))


class OPTDecoderLayer(nn.Module):
    def __init__(self, a: OPTArgs, s: Shard) -> None:
        super().__init__()
        self.pre = a.pre_layer_norm
        self.act = _ACTIVATIONS[a.activation]
        self.self_attn = OPTAttention(a, s.heads[1] - s.heads[0])
        self.self_attn_layer_norm = nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_affine)
        self.fc1 = nn.Linear(a.hidden_size, s.ffn[1] - s.ffn[0], bias=a.bias)
        self.fc2 = nn.Linear(s.ffn[1] - s.ffn[0], a.hidden_size, bias=a.bias)
        self.final_layer_norm = nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_affine)
        self.tp_reduce = no_reduce

    def forward(self, x, layer_cache, meta):
        h = self.self_attn_layer_norm(x) if self.pre else x
        x = x + self.self_attn(h, layer_cache, meta)
        if not self.pre:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre else x
        x = x + self.tp_reduce(self.fc2(self.act(self.fc1(h))))
        return x if self.pre else self.final_layer_norm(x)


class OPTForCausalLM(nn.Module):
    """The whole model, or one tensor/pipeline-parallel worker's part of it (`shard`)."""

    STAGE_TENSORS = 1   # what one pipeline stage hands the next: the hidden states

    def __init__(self, hf_config: dict, shard: Shard | None = None) -> None:
        super().__init__()
        a = self.args = OPTArgs.from_hf(hf_config)
        s = self.shard = shard or make_shard(self.dims(hf_config), 1, 1, 0)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(a.max_positions + _POSITION_OFFSET, a.hidden_size)
        narrow = a.word_embed_proj_dim != a.hidden_size
        self.project_in = nn.Linear(a.word_embed_proj_dim, a.hidden_size, bias=False) if narrow else None
        self.project_out = nn.Linear(a.hidden_size, a.word_embed_proj_dim, bias=False) if narrow else None
        self.layers = nn.ModuleList(OPTDecoderLayer(a, s) for _ in range(*s.layers))
        self.final_layer_norm = (nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_affine)
                                 if a.final_layer_norm else None)
        # the head is tied: with TP its vocabulary range is a view of the embedding rows
        self.lm_head = (nn.Linear(a.word_embed_proj_dim, a.vocab_size, bias=False)
                        if s.tp == 1 else None)
        self.tie_weights()

    @staticmethod
    def dims(hf_config: dict) -> ModelDims:
        a = OPTArgs.from_hf(hf_config)
        return ModelDims(a.num_layers, a.num_heads, a.num_heads, a.ffn_dim, a.vocab_size)

    num_layers = property(lambda self: len(self.layers))
    num_kv_heads = property(lambda self: self.shard.kv_heads[1] - self.shard.kv_heads[0])
    head_dim = property(lambda self: self.args.hidden_size // self.args.num_heads)
    max_positions = property(lambda self: self.args.max_positions)

    def tie_weights(self) -> None:
        if self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight  # OPT always ties its output layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        state = self.embed(input_ids, positions)
        return self.finish(self.run_layers(state, positions, kv_cache, meta))

    # -- the three parts a pipeline stage runs (first: embed; last: finish)
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return (x + self.embed_positions(positions + _POSITION_OFFSET),)

    def run_layers(self, state: tuple, positions: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata) -> tuple:
        x, = state
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache[:, i], meta)
        return (x,)

    def finish(self, state: tuple) -> torch.Tensor:
        x, = state
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This worker's vocabulary range of the logits, in the model dtype."""
        if self.lm_head is None:
            lo, hi = self.shard.vocab
            return F.linear(hidden, self.embed_tokens.weight[lo:hi])
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        s = self.shard
        h = (s.heads[1] - s.heads[0]) * self.head_dim
        fused = {"q_proj": ("qkv_proj", 0, h), "k_proj": ("qkv_proj", h, h),
                 "v_proj": ("qkv_proj", 2 * h, h)}

        def normalise(name: str) -> str | None:
            return None if name == "lm_head.weight" else name

        named = ((n.removeprefix("model.").removeprefix("decoder."), t) for n, t in weights)
        load_weights(self, shard_weights(named, s, TP_CUTS, self.head_dim), normalise, fused)
