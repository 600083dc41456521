"""A prefill-side KV source in its own process, as a real prefill instance would be.

Run as a script: allocates a shared-memory cache, fills it from a seeded generator (so the
parent can recompute every byte), serves the same cache over TCP too, prints one JSON line
{"shm": endpoint, "tcp": endpoint}, and closes both when its stdin reaches EOF.
"""
from __future__ import annotations

import sys

import torch

from distserve.kv.cache import KVCacheShape

SHAPE = KVCacheShape(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4)
NUM_BLOCKS = 24
SECRET = b"the transfer tests' deployment secret"  # both sides of a test know it


def seeded_cache(dtype: torch.dtype, seed: int, num_blocks: int = NUM_BLOCKS,
                 shape: KVCacheShape = SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, shape.num_layers, 2, shape.block_size, shape.num_kv_heads,
                       shape.head_dim, generator=g).to(dtype)


def main() -> None:
    import msgspec

    from distserve.transfer import TcpSource, allocate_shm_cache

    dtype, seed = getattr(torch, sys.argv[1]), int(sys.argv[2])
    cache, shm = allocate_shm_cache(SHAPE, NUM_BLOCKS, dtype)
    cache.copy_(seeded_cache(dtype, seed))
    tcp = TcpSource(cache, "127.0.0.1", 0, secret=SECRET)
    print(msgspec.json.encode({"shm": shm.endpoint, "tcp": tcp.endpoint}).decode(), flush=True)
    sys.stdin.read()
    tcp.close()
    shm.close()


if __name__ == "__main__":
    main()
