"""Gives requests the blocks their tokens need and takes them back.

The scheduler asks `can_allocate` before admitting work and `free` when a request ends,
is preempted or aborted, so every block comes back whatever happens to the request.
"""
from __future__ import annotations

from distserve.kv.block_allocator import BlockAllocator
from distserve.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        return self.allocator.usage

    def num_new_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` still needs so that its first `num_tokens` tokens have a slot."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(request.block_table))

    def can_allocate(self, request: Request, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_new_blocks(request, num_tokens) + reserve <= self.allocator.num_free

    def allocate(self, request: Request, num_tokens: int) -> None:
        n = self.num_new_blocks(request, num_tokens)
        if n:
            request.block_table.extend(self.allocator.allocate(n))

    def free(self, request: Request) -> None:
        if request.block_table:
            self.allocator.free(request.block_table)
            request.block_table = []
        request.num_computed_tokens = 0
