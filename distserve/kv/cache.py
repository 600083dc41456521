"""The KV cache tensor, block-major so one block holds every layer's K and V.

Layout [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]: a request's whole
cache is a set of rows of dim 0, which lets a transfer move it with one index_select.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def tensor_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, memory_bytes: int, dtype: torch.dtype) -> int:
        n = int(memory_bytes // self.bytes_per_block(dtype))
        if n < 1:
            raise ValueError(
                f"KV cache budget of {memory_bytes / 2**20:.1f} MiB holds no block of "
                f"{self.bytes_per_block(dtype) / 2**20:.2f} MiB; raise --kv-cache-memory")
        return n


def allocate_kv_cache(shape: KVCacheShape, num_blocks: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(shape.tensor_shape(num_blocks), dtype=dtype, device=device)


@dataclass
class KVShard:
    """One worker's share of an instance's KV cache: its layers and its KV heads (the whole
    cache for an instance of one worker)."""
    cache: torch.Tensor   # [num_blocks, layers, 2, block_size, kv_heads, head_dim]
    layer_start: int = 0
    head_start: int = 0
    owner: Any = None     # what frees the memory (a shared-memory segment), or None
