"""CPU tensors on 2 MB pages, where Linux gives them (transparent huge pages on request).

Why: a batch-1 decode step streams every weight once, each thread a few hundred KB of a
matrix at a time. On 4 KB pages every 4 KB is a TLB miss and a page the hardware prefetcher
does not cross; most Linux hosts (this project's VMs included: THP "madvise") give a
process 2 MB pages only where it asks. SmolLM2's 121 packed matrices streamed at one row in
0.80x the time from one arena on 2 MB pages as from torch's own allocations (AMD Zen 4, 2
threads, side by side in one process; a 4 KB-page arena alone: 0.94x).
"""
from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def zeroed_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` zeros, 2 MB aligned, on memory asked to be backed by huge pages.

    Anonymous private memory from mmap, madvised before any page is touched, so the first
    writes fault in 2 MB pages where the kernel allows it (THP "always" or "madvise"); where
    it does not (THP "never", no MADV_HUGEPAGE), plain pages: the tensor works the same.
    The tensor keeps the mapping alive (torch.frombuffer holds the buffer).
    """
    if nbytes <= 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(max(nbytes, 0), dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass   # a kernel without THP: plain pages
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def one_arena(shapes: list[tuple[int, ...]], dtype: torch.dtype, align: int = 4096) -> list[torch.Tensor]:
    """Zero-filled tensors of these shapes, one after another in one huge-page buffer (each
    `align`-byte aligned), in the order given: the order a decode step reads them."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    offsets, size = [], 0
    for shape in shapes:
        size = -(-size // align) * align
        offsets.append(size)
        size += math.prod(shape) * itemsize
    arena = zeroed_bytes(size)
    return [arena[offset:offset + math.prod(shape) * itemsize].view(dtype).view(shape)
            for shape, offset in zip(shapes, offsets)]
