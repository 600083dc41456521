"""Paged attention: writes new K/V into cache blocks and attends through block tables.

A batch is a flat list of tokens: prefill segments first (one per request, each a chunk of
its prompt), then one token per decoding request. Prefill segments run one by one (they are
compute-bound); decode tokens run together, their contexts gathered from the cache at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distserve.models import paged_kernel, triton_attention


@dataclass
class PrefillSegment:
    start: int          # index of the segment's first token in the flat batch
    num_tokens: int     # tokens computed in this step
    context_len: int    # tokens in the cache after this step (earlier chunks + this one)
    block_table: torch.Tensor  # [num_blocks] long


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor    # [T] block id where each new token's K/V goes
    slot_offsets: torch.Tensor   # [T] position inside that block
    prefills: list[PrefillSegment]
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] long (padded)
    decode_context_lens: torch.Tensor | None  # [B] long, including the new token
    decode_key_mask: torch.Tensor | None = None  # [B, 1, 1, S] additive mask, built once

    @property
    def num_decode_tokens(self) -> int:
        return 0 if self.decode_context_lens is None else int(self.decode_context_lens.shape[0])


def build_decode_mask(context_lens: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, S] that hides the padding slots past each context."""
    pos = torch.arange(num_slots, device=context_lens.device)
    mask = torch.zeros(context_lens.shape[0], num_slots, dtype=dtype, device=context_lens.device)
    mask.masked_fill_(pos[None, :] >= context_lens[:, None], float("-inf"))
    return mask[:, None, None, :]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    layer_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, cache_written: bool = False) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], layer_cache [num_blocks, 2, block_size, Hkv, D].

    Returns the attention output [T, Hq, D]. `cache_written`: k and v are in their cache
    slots already (the fused rotary kernel put them there).
    """
    if not cache_written:
        layer_cache[meta.slot_blocks, 0, meta.slot_offsets] = k
        layer_cache[meta.slot_blocks, 1, meta.slot_offsets] = v
    if not meta.prefills:
        return _decode_attention(q, layer_cache, meta, scale)
    out = torch.empty_like(q)
    for seg in meta.prefills:
        s, e = seg.start, seg.start + seg.num_tokens
        if seg.context_len == seg.num_tokens:  # whole prompt in this step: K/V are at hand
            ks, vs = k[s:e], v[s:e]
        else:
            ks = gather_blocks(layer_cache, seg.block_table, 0)[: seg.context_len]
            vs = gather_blocks(layer_cache, seg.block_table, 1)[: seg.context_len]
        out[s:e] = _prefill_attention(q[s:e], ks, vs, seg.context_len - seg.num_tokens, scale)
    if meta.num_decode_tokens:
        n = meta.num_prefill_tokens
        out[n:] = _decode_attention(q[n:], layer_cache, meta, scale)
    return out


def gather_blocks(layer_cache: torch.Tensor, block_table: torch.Tensor, kv: int) -> torch.Tensor:
    """K (kv=0) or V (kv=1) of the blocks in `block_table` [..., nb] as [..., nb * bs, Hkv, D].

    index_select copies whole blocks, the cheapest gather torch offers (advanced indexing
    of both K and V at once was three times slower), and its result is contiguous, so the
    block and slot dims merge without another copy.
    """
    rows = layer_cache[:, kv].index_select(0, block_table.flatten())
    return rows.view(*block_table.shape[:-1], -1, *rows.shape[-2:])


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       num_cached: int, scale: float) -> torch.Tensor:
    """Causal attention of q [n, Hq, D] over k/v [num_cached + n, Hkv, D]."""
    hq, hkv = q.shape[1], k.shape[1]
    # [1, H, n, D]: with a batch dimension the CPU takes its flash kernel (20x the math path)
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if num_cached == 0:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale,
                                           enable_gqa=hq != hkv)
    else:
        total = k.shape[0]
        qpos = torch.arange(num_cached, total, device=q.device)[:, None]
        allowed = torch.arange(total, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=scale,
                                           enable_gqa=hq != hkv)
    return o[0].transpose(0, 1)


def _decode_attention(q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """One query per request against its cached context.

    On CPU the compiled kernel reads the blocks in place, on CUDA the Triton kernel where
    Triton is installed; otherwise gathered_decode_attention, with the key mask built once a
    step (kept on `meta`).
    """
    if layer_cache.device.type == "cpu" and paged_kernel.kernel_available():
        return paged_kernel.paged_decode_attention(q, layer_cache, meta.decode_block_tables,
                                                   meta.decode_context_lens, scale)
    if triton_attention.available(layer_cache.device, layer_cache.shape[2], q.dtype):
        return triton_attention.paged_decode_attention(q, layer_cache, meta.decode_block_tables,
                                                       meta.decode_context_lens, scale)
    slots = meta.decode_block_tables.shape[1] * layer_cache.shape[2]
    mask = meta.decode_key_mask
    if mask is None or mask.shape[-1] != slots or mask.dtype != q.dtype:
        mask = build_decode_mask(meta.decode_context_lens, slots, q.dtype)
        meta.decode_key_mask = mask
    return gathered_decode_attention(q, layer_cache, meta.decode_block_tables, mask, scale)


def gathered_decode_attention(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                              key_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch path of decode attention, and the kernels' reference: the blocks gathered
    into a tensor padded to the widest table, [B, S, Hkv, D], which SDPA takes through
    transposed views (its CPU kernel works in that layout), grouping query heads itself, so
    nothing else is copied. key_mask: build_decode_mask over the S slots."""
    b, hq, d = q.shape
    k = gather_blocks(layer_cache, block_tables, 0)
    v = gather_blocks(layer_cache, block_tables, 1)
    o = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=key_mask, scale=scale, enable_gqa=hq != k.shape[2])
    return o.reshape(b, hq, d)
