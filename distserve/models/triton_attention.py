"""Paged decode attention on the GPU in Triton: each request's K/V read from its cache blocks
through its block table, with no copy into a padded tensor (the torch path gathers every
request's blocks, padded to the longest context, at every layer of every step).

One program per (request, KV head) (triton_kernels.py): it loads the query heads of that KV
head's group once, then walks the request's blocks with an online softmax, in float32 whatever
the cache dtype. Its shapes do not depend on the contexts' lengths (the loop bound is read on
the device), so a decode step that calls it can be captured in a CUDA graph.

Triton is optional: without it, off CUDA, at a block size that is no power of 2, or where a
first tiny launch fails (a GPU or dtype this Triton cannot compile for), attention.py keeps the
torch path. Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors,
which is how the tests check it on machines with no GPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)
_works: dict[tuple, bool] = {}   # (device, dtype) -> did a first launch run and agree


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device, block_size: int, dtype: torch.dtype) -> bool:
    """Can the kernel serve this cache: CUDA, Triton installed, a power-of-2 block size, and a
    first launch on this device and dtype that ran and matched the torch path."""
    if device.type != "cuda" or block_size < 1 or block_size & (block_size - 1) or not installed():
        return False
    key = (device, dtype)
    if key not in _works:
        _works[key] = _probe(device, dtype)
    return _works[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    from distserve.models.attention import build_decode_mask, gathered_decode_attention
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        cache = torch.randn(4, 2, 16, 2, 64, generator=g).to(device, dtype)
        q = torch.randn(2, 4, 64, generator=g).to(device, dtype)
        tables = torch.tensor([[2, 0], [1, 3]], device=device)
        lens = torch.tensor([20, 7], device=device)
        got = paged_decode_attention(q, cache, tables, lens, 0.125).float()
        want = gathered_decode_attention(q.float(), cache.float(), tables,
                                         build_decode_mask(lens, 2 * 16, torch.float32), 0.125)
        if torch.allclose(got, want, rtol=3e-2, atol=3e-2):
            return True
        log.warning("Triton's paged attention disagrees with torch on %s in %s: torch path used",
                    device, dtype)
    except Exception as exc:  # no compiler for this GPU, a driver mismatch, ...
        log.warning("Triton's paged attention failed on %s in %s (%s): torch path used", device, dtype, exc)
    return False


def paged_decode_attention(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (rows may be apart, each row's heads contiguous) over the cached contexts
    (layer_cache [blocks, 2, block_size, Hkv, D], block_tables [B, W], context_lens [B], each
    at least 1) -> [B, Hq, D]."""
    import triton

    from distserve.models.triton_kernels import paged_decode_kernel
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
    on_cuda = q.device.type == "cuda"   # (the interpreter's CPU tensors have no device to switch to)
    with torch.cuda.device(q.device) if on_cuda else contextlib.nullcontext():
        # Triton launches on the current device: make it the tensors' one
        paged_decode_kernel[(batch, num_kv_heads)](
            out, q, layer_cache, block_tables, context_lens, scale,
            q.stride(0), q.stride(1), layer_cache.stride(0), layer_cache.stride(1),
            layer_cache.stride(2), layer_cache.stride(3), block_tables.stride(0), out.stride(0),
            out.stride(1), GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK=block_size,
            DIM=dim, DIM_PAD=triton.next_power_of_2(dim))
    return out
