"""A Llama stack's decode step as one call into C++ (csrc/decode_layers.cpp), where the
layers would run on our CPU kernels anyway: bf16 weights packed for our linear kernel, no
tensor parallelism, a decode-only batch. Other batches, and every other machine, keep the
layers' Python forward, which computes the same values.

Why: at batch 1 the Python between the kernels (about 9 op calls and 9 module calls a
layer) took 5-8 ms of SmolLM2's ~25 ms step on a 2-core Zen 3.
"""
from __future__ import annotations

import torch

from distserve.models import paged_kernel
from distserve.models.attention import AttentionMetadata
from distserve.models.packed_linear import PackedLinear
from distserve.models.sharding import no_reduce

_KERNELS = ("amx", "dpbf16", "avx2")   # the linear kernels that take packed bf16 blocks


class DecodeLayers:
    """The decoder layers' weights in the order the C++ op takes them, gathered once."""

    def __init__(self, layers, kernel: str) -> None:
        first = layers[0]
        attn, mlp = first.self_attn, first.mlp
        self.kernel = kernel
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim, self.scale = attn.head_dim, attn.scale
        self.ffn = mlp.down_proj.in_features
        self.eps = first.input_layernorm.eps
        self.weights = [t for layer in layers for t in (
            layer.input_layernorm.weight, layer.self_attn.qkv_proj.packed_weight,
            layer.self_attn.o_proj.packed_weight, layer.post_attention_layernorm.weight,
            layer.mlp.gate_up_proj.packed_weight, layer.mlp.down_proj.packed_weight)]
        self.qkv_biases = [None if layer.self_attn.qkv_proj.bias is None
                           else layer.self_attn.qkv_proj.bias.detach() for layer in layers]

    @classmethod
    def of(cls, layers) -> DecodeLayers | None:
        """The fused stack for these layers, or None where the Python forward must run them."""
        linears = [m for layer in layers for m in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if not linears or not all(isinstance(m, PackedLinear) for m in linears):
            return None    # not packed: a GPU, float32, or a CPU where oneDNN's layout won
        if not paged_kernel.kernel_available():
            return None
        kernels = {m.kernel for m in linears}
        if len(kernels) != 1 or next(iter(kernels)) not in _KERNELS:
            return None
        if any(m.tp_reduce is not no_reduce for layer in layers for m in (layer.self_attn, layer.mlp)):
            return None    # tensor parallel: the sums over workers run between the kernels
        norms = [n.weight for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms):
            return None
        return cls(layers, kernels.pop())

    def applies(self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> bool:
        """A decode-only batch, in the tensors the kernels take."""
        return (not meta.prefills and meta.decode_block_tables is not None
                and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
                and x.is_contiguous()
                and (residual is None or (residual.is_contiguous() and residual.dtype == torch.bfloat16))
                and self.takes_cache(kv_cache))

    def takes_cache(self, kv_cache: torch.Tensor) -> bool:
        """A bf16 cache laid out as the kernels read it (each head's dim contiguous)."""
        return (kv_cache.dtype == torch.bfloat16 and kv_cache.stride(-1) == 1
                and kv_cache.stride(-2) == self.head_dim)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None,
                 rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.distserve_cpu.llama_decode_layers(*self._args(x, residual, rope, kv_cache, meta))

    def takes_head(self, norm, head) -> bool:
        """Can `logits` end the stack with this final norm and head (the model's own)."""
        return (isinstance(head, PackedLinear) and head.kernel == self.kernel and head.bias is None
                and norm.eps == self.eps and norm.weight.dtype == torch.bfloat16
                and norm.weight.is_contiguous())

    def logits(self, x: torch.Tensor, residual: torch.Tensor | None,
               rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
               meta: AttentionMetadata, norm, head: PackedLinear) -> torch.Tensor:
        """The layers, the final norm and the head in the same call: the logits of every row.
        After the layers have streamed the weights through the caches, each Python op finds
        its state gone (the final norm alone took ~170 us from Python); see
        csrc/decode_layers.cpp."""
        return torch.ops.distserve_cpu.llama_decode_logits(
            *self._args(x, residual, rope, kv_cache, meta), norm.weight, head.packed_weight,
            head.out_features)

    def greedy_ahead(self, input_ids: torch.Tensor, embedding: torch.Tensor,
                     rope_table: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                     norm, head: PackedLinear, steps: int, last_lens: torch.Tensor) -> torch.Tensor:
        """The next `steps` greedy tokens [B, steps] of a decode-only batch in one call
        (csrc/decode_layers.cpp llama_decode_ahead): the same tokens as `steps` calls of
        `logits` and an argmax, without the Python between them. Row i counts up to context
        last_lens[i] (its block table holds the slots); its later tokens are to be dropped."""
        return torch.ops.distserve_cpu.llama_decode_ahead(
            input_ids, embedding, rope_table, self.weights, self.qkv_biases, kv_cache,
            meta.decode_block_tables, meta.decode_context_lens, last_lens, self.num_heads,
            self.num_kv_heads, self.ffn, self.eps, self.scale, self.kernel, norm.weight,
            head.packed_weight, head.out_features, steps)

    def _args(self, x, residual, rope, kv_cache, meta) -> tuple:
        cos, sin = (t.reshape(t.shape[0], t.shape[-1]) for t in rope)
        return (x, residual, self.weights, self.qkv_biases, kv_cache, cos, sin, meta.slot_blocks,
                meta.slot_offsets, meta.decode_block_tables, meta.decode_context_lens,
                self.num_heads, self.num_kv_heads, self.ffn, self.eps, self.scale, self.kernel)
