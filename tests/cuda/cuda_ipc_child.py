"""A prefill-side cuda_ipc KV source in its own process, as a real prefill instance would be.

Run as a script: allocates a KV cache on cuda:0 through make_source("cuda_ipc"), fills it with
values the parent recomputes (expected_cache), prints its endpoint as one line of msgpack in
hex (no pickle), and exits when its stdin reaches EOF.
"""
from __future__ import annotations

import sys

import torch

from distserve.kv.cache import KVCacheShape

SHAPE = KVCacheShape(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4)
NUM_BLOCKS = 24


def expected_cache() -> torch.Tensor:
    """Distinct exact float32 values, in host memory."""
    shape = SHAPE.tensor_shape(NUM_BLOCKS)
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)


def main() -> None:
    import msgspec

    from distserve.transfer import make_source

    cache, source = make_source("cuda_ipc", SHAPE, NUM_BLOCKS, torch.float32, "cuda:0",
                                secret=b"cuda_ipc checks no secret")
    cache.copy_(expected_cache().to(cache.device))
    torch.cuda.synchronize()   # as a prefill instance's KV is written before its first token
    print(msgspec.msgpack.encode(source.endpoint).hex(), flush=True)
    sys.stdin.read()
    source.close()


if __name__ == "__main__":
    main()
