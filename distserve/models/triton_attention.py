"""Paged decode attention on the GPU in Triton: each request's K/V read from its cache blocks
through its block table, with no copy into a padded tensor (the torch path gathers every
request's blocks, padded to the longest context, at every layer of every step).

One program per (request, KV head): it loads the query heads of that KV head's group once,
then walks the request's blocks with an online softmax, in float32 whatever the cache dtype.
Its shapes do not depend on the contexts' lengths (the loop bound is read on the device), so a
decode step that calls it can be captured in a CUDA graph.

Triton is optional: without it (or off CUDA) attention.py keeps the torch path. Triton's
interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors, which is how the tests
check it on machines with no GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # not installed (CPU-only machines need not have it)
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _paged_decode_kernel(out_ptr, q_ptr, cache_ptr, tables_ptr, lens_ptr, scale,
                             stride_qb, stride_qh, stride_cb, stride_ckv, stride_cs, stride_ch,
                             stride_tb, stride_ob, stride_oh,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr,
                             DIM: tl.constexpr, DIM_PAD: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        context = tl.load(lens_ptr + b)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        s = tl.arange(0, BLOCK)
        g_ok, d_ok = g < GROUP, d < DIM
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        top = tl.full([GROUP_PAD], float("-inf"), tl.float32)   # running max of the scores
        total = tl.zeros([GROUP_PAD], tl.float32)                # running sum of exp(score - top)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        for i in range(0, tl.cdiv(context, BLOCK)):
            block = tl.load(tables_ptr + b * stride_tb + i).to(tl.int64)
            s_ok = i * BLOCK + s < context
            rows = cache_ptr + block * stride_cb + s[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
            kv_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(rows, mask=kv_ok, other=0.0).to(tl.float32)                # [BLOCK, DIM]
            v = tl.load(rows + stride_ckv, mask=kv_ok, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale        # [GROUP, BLOCK]
            scores = tl.where(s_ok[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            p = tl.exp(scores - new_top[:, None])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(p, axis=1)
            acc = acc * shrink[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            top = new_top
        out = acc / total[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (rows may be apart, each row's heads contiguous) over the cached contexts
    (layer_cache [blocks, 2, block_size, Hkv, D], block_tables [B, W], context_lens [B], each
    at least 1) -> [B, Hq, D]."""
    if triton is None:
        raise RuntimeError("paged_decode_attention: Triton is not installed")
    batch, num_heads, dim = q.shape
    num_kv_heads, block_size = layer_cache.shape[3], layer_cache.shape[2]
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    if layer_cache.stride(4) != 1:
        raise ValueError("paged_decode_attention: the cache's last dim must be contiguous")
    if block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention: block size {block_size} is not a power of 2")
    group = num_heads // num_kv_heads
    out = torch.empty(batch, num_heads, dim, dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(batch, num_kv_heads)](
        out, q, layer_cache, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2),
        layer_cache.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK=block_size,
        DIM=dim, DIM_PAD=triton.next_power_of_2(dim))
    return out
