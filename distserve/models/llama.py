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
from distserve.models.decode_layers import DecodeLayers
from distserve.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from distserve.models.sharding import ModelDims, Shard, make_shard, no_reduce, shard_weights
from distserve.models.weights import load_weights

# how tensor parallelism cuts each checkpoint weight (see sharding.py)
TP_CUTS = {"q_proj": (0, "heads"), "k_proj": (0, "kv_heads"), "v_proj": (0, "kv_heads"),
           "o_proj": (1, "heads"), "gate_proj": (0, "ffn"), "up_proj": (0, "ffn"),
           "down_proj": (1, "ffn"), "lm_head": (0, "vocab")}


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
    def __init__(self, a: LlamaArgs, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, a.head_dim
        self.q_size, self.kv_size = num_heads * a.head_dim, num_kv_heads * a.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=False)
        self.scale = a.head_dim ** -0.5
        self.tp_reduce = no_reduce   # the sum over tensor-parallel workers, set by the executor

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], layer_cache,
                meta: AttentionMetadata):
        heads = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if fused.rotary_cache_write(heads, *rope, layer_cache, meta.slot_blocks, meta.slot_offsets,
                                    self.num_heads):
            q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
            o = paged_attention(q, k, v, layer_cache, meta, self.scale, cache_written=True)
            return self.tp_reduce(self.o_proj(o.reshape(-1, self.q_size)))
        qk_heads = self.num_heads + self.num_kv_heads  # q and k are adjacent: rotate both at once
        q, k = apply_rotary(heads[:, :qk_heads], *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        o = paged_attention(q, k, heads[:, qk_heads:], layer_cache, meta, self.scale)
        return self.tp_reduce(self.o_proj(o.reshape(-1, self.q_size)))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, ffn: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * ffn, bias=False)
        self.down_proj = nn.Linear(ffn, a.hidden_size, bias=False)
        self.tp_reduce = no_reduce

    def forward(self, x):
        return self.tp_reduce(self.down_proj(fused.silu_mul(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, s: Shard) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = LlamaAttention(a, s.heads[1] - s.heads[0], s.kv_heads[1] - s.kv_heads[0])
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = LlamaMLP(a, s.ffn[1] - s.ffn[0])

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
    """The whole model, or one tensor/pipeline-parallel worker's part of it (`shard`)."""

    STAGE_TENSORS = 2   # what one pipeline stage hands the next: hidden states and residual
    fused_decode = True  # decode-only batches in one C++ call where it applies (decode_layers.py)

    def __init__(self, hf_config: dict, shard: Shard | None = None) -> None:
        super().__init__()
        a = self.args = LlamaArgs.from_hf(hf_config)
        s = self.shard = shard or make_shard(self.dims(hf_config), 1, 1, 0)
        self.rotary = RotaryEmbedding(a.head_dim, a.max_positions, a.rope_theta, a.rope_scaling)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)  # on every stage: tied heads
        self.layers = nn.ModuleList(LlamaDecoderLayer(a, s) for _ in range(*s.layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = (nn.Linear(a.hidden_size, s.vocab[1] - s.vocab[0], bias=False)
                        if s.is_last_stage and not (a.tie_word_embeddings and s.tp > 1) else None)
        self.tie_weights()

    @staticmethod
    def dims(hf_config: dict) -> ModelDims:
        a = LlamaArgs.from_hf(hf_config)
        return ModelDims(a.num_layers, a.num_heads, a.num_kv_heads, a.intermediate_size,
                         a.vocab_size)

    # -- what the engine needs to know to size the KV cache (this worker's share)
    num_layers = property(lambda self: len(self.layers))
    num_kv_heads = property(lambda self: self.shard.kv_heads[1] - self.shard.kv_heads[0])
    head_dim = property(lambda self: self.args.head_dim)
    max_positions = property(lambda self: self.args.max_positions)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.finish(self.run_layers(self.embed(input_ids, positions), positions, kv_cache, meta))

    # -- the three parts a pipeline stage runs (first: embed; last: finish)
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple:
        return self.embed_tokens(input_ids), None

    def run_layers(self, state: tuple, positions: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata) -> tuple:
        x, residual = state
        rope = self.rotary.cos_sin(positions, x.dtype)
        fused = self._decode_layers() if self.fused_decode else None
        if fused is not None and fused.applies(x, residual, kv_cache, meta):
            return fused(x, residual, rope, kv_cache, meta)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, kv_cache[:, i], meta)
        return x, residual

    def sampled_logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv_cache: torch.Tensor, meta: AttentionMetadata,
                       logit_rows: torch.Tensor) -> torch.Tensor:
        """The logits of the rows `logit_rows` names. A decode-only batch (every row sampled)
        on our CPU kernels runs its layers, final norm and head in one C++ call."""
        state = self.embed(input_ids, positions)
        fused = self._decode_tail() if self.fused_decode else None
        if fused is not None and fused.applies(state[0], state[1], kv_cache, meta):
            rope = self.rotary.cos_sin(positions, state[0].dtype)
            return fused.logits(*state, rope, kv_cache, meta, self.norm, self.lm_head)
        hidden = self.finish(self.run_layers(state, positions, kv_cache, meta))
        return self.compute_logits(hidden[logit_rows])

    def can_decode_ahead(self, kv_cache: torch.Tensor) -> bool:
        """Can `greedy_ahead` run: the whole model here (one worker) on our CPU kernels, with
        its embedding and KV in bf16."""
        w, tail = self.embed_tokens.weight, self._decode_tail()
        return (self.fused_decode and tail is not None and tail.takes_cache(kv_cache)
                and len(self.layers) == self.args.num_layers and type(self.embed_tokens) is nn.Embedding
                and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous())

    def greedy_ahead(self, input_ids: torch.Tensor, kv_cache: torch.Tensor,
                     meta: AttentionMetadata, steps: int, last_lens: torch.Tensor) -> torch.Tensor:
        """The next `steps` greedy tokens [B, steps] of a decode-only batch, row i's counting
        up to context last_lens[i] (can_decode_ahead must hold; each block table must hold
        its slots): see DecodeLayers.greedy_ahead."""
        w = self.embed_tokens.weight
        return self._decode_tail().greedy_ahead(
            input_ids, w.detach(), self.rotary.table(w.device, w.dtype), kv_cache, meta,
            self.norm, self.lm_head, steps, last_lens)

    def _decode_tail(self) -> DecodeLayers | None:
        """The fused stack where it can also end in this model's final norm and head: the
        same once packed, so asked once, not at every step."""
        if not hasattr(self, "_fused_tail"):
            layers = self._decode_layers()
            self._fused_tail = (layers if layers is not None and self.lm_head is not None
                                and layers.takes_head(self.norm, self.lm_head) else None)
        return self._fused_tail

    def _decode_layers(self) -> DecodeLayers | None:
        """Gathered at the first decode step: the loader packs the linear layers once, before
        it, and nothing swaps them after."""
        if not hasattr(self, "_fused_layers"):
            self._fused_layers = DecodeLayers.of(self.layers)
        return self._fused_layers

    def finish(self, state: tuple) -> torch.Tensor:
        x, residual = state
        return self.norm(x, residual)[0] if residual is not None else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This worker's vocabulary range of the logits, in the model dtype (the sampler
        widens only when it must)."""
        if self.lm_head is None:  # a tied head cut by vocabulary: a view of the embedding rows
            lo, hi = self.shard.vocab
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight[lo:hi])
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in (this worker's slices), fusing q/k/v and gate/up."""
        a, s = self.args, self.shard
        q = (s.heads[1] - s.heads[0]) * a.head_dim
        kv = (s.kv_heads[1] - s.kv_heads[0]) * a.head_dim
        ffn = s.ffn[1] - s.ffn[0]
        fused = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv),
                 "v_proj": ("qkv_proj", q + kv, kv),
                 "gate_proj": ("gate_up_proj", 0, ffn), "up_proj": ("gate_up_proj", ffn, ffn)}

        def normalise(name: str) -> str | None:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (a.tie_word_embeddings and name == "lm_head.weight"):
                return None
            return name

        named = ((n.removeprefix("model."), t) for n, t in weights)
        load_weights(self, shard_weights(named, s, TP_CUTS, a.head_dim, ("lm_head",)),
                     normalise, fused)
