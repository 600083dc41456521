"""Checksums of KV blocks (--kv-checksum): the prefill side sums each block it hands over,
the decode side sums what it pulled, and a block that differs (a bad copy, a segment that was
written meanwhile) fails the pull, so the request is computed again instead of decoded from
bad KV. CRC-32 over each block's bytes, all layers: 3.5 GB/s on one core here, 0.1 ms for one
SmolLM2 block of 16 tokens (360 KiB), on each side."""
from __future__ import annotations

import zlib
from typing import Sequence

import torch

from distserve.transfer.base import TransferError, byte_rows


def block_checksums(cache: torch.Tensor, block_ids: Sequence[int]) -> list[int]:
    rows = byte_rows(cache if cache.device.type == "cpu" else cache[list(block_ids)].cpu())
    ids = block_ids if cache.device.type == "cpu" else range(len(block_ids))
    return [zlib.crc32(rows[b]) for b in ids]


def verify_blocks(cache: torch.Tensor, block_ids: Sequence[int], expected: Sequence[int]) -> None:
    """Raises TransferError naming the first block whose bytes are not what was sent."""
    for i, (got, want) in enumerate(zip(block_checksums(cache, block_ids), expected)):
        if got != want:
            raise TransferError(f"KV block {i} of the request failed its checksum "
                                f"(CRC-32 {got:08x}, sent {want:08x})")
