"""Same-host KV transfer through POSIX shared memory.

The prefill instance's cache tensor *is* a named segment; a decode instance maps it once and
copies a request's blocks straight into its own cache (one memcpy per block). Nothing serves.

A process that only maps the segment must never unlink it, nor leave that to Python's resource
tracker when it exits. Python < 3.13 registers every SharedMemory attach with the tracker, and
unregistering afterwards is not enough when the attaching process shares its tracker with the
owner (a multiprocessing child does): so the decode side maps the segment itself, untracked.
"""
from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from distserve.kv.cache import KVCacheShape
from distserve.transfer.base import (KVEndpoint, Region, TransferError, TransferStats,
                                     check_block_ids, check_pull, copy_rows)

try:
    import _posixshmem  # the stdlib's own shm_open, which SharedMemory itself calls
except ImportError:  # Windows
    _posixshmem = None


def _map_segment(name: str, reserve: int = 0) -> mmap.mmap:
    """Map an existing segment without telling any resource tracker about it."""
    if _posixshmem is None:
        raise TransferError("the shm KV transfer backend needs POSIX shared memory; use tcp")
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        if reserve and hasattr(os, "posix_fallocate"):
            # ftruncate alone leaves tmpfs pages unbacked: a full /dev/shm would then kill the
            # process with SIGBUS on first touch instead of failing here with a clear error.
            os.posix_fallocate(fd, 0, reserve)
        # populated: faulting pages in one by one on first touch cost 1.3 ms per MB written here
        # (~4% of a prefill writing into fresh blocks; page faults are dear in a VM)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, os.fstat(fd).st_size, flags=flags)
    finally:
        os.close(fd)


def _segment_exists(name: str) -> bool:
    try:
        os.close(_posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600))
    except FileNotFoundError:
        return False
    return True


class ShmSource:
    """Owns the segment: unlinks it on close (or, if this process dies, its resource tracker
    does). The mapping itself lives until the last tensor viewing it is gone."""

    def __init__(self, cache: torch.Tensor, endpoint: KVEndpoint, segment: SharedMemory) -> None:
        self.cache = cache
        self.endpoint = endpoint
        self._segment: SharedMemory | None = segment

    def close(self) -> None:
        if self._segment is not None:
            segment, self._segment = self._segment, None
            try:
                segment.unlink()
            except FileNotFoundError:  # someone else unlinked it: still stop tracking it
                resource_tracker.unregister("/" + segment.name, "shared_memory")


def allocate_shm_cache(shape: KVCacheShape, num_blocks: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, ShmSource]:
    """Allocate a prefill instance's KV cache (zeros) in a new shared-memory segment."""
    if num_blocks < 1:
        raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
    nbytes = num_blocks * shape.bytes_per_block(dtype)
    segment = SharedMemory(create=True, size=nbytes)  # tracked: a crashed owner still unlinks
    try:
        mapping = _map_segment(segment.name, reserve=nbytes)
    except OSError as e:
        segment.close()
        segment.unlink()
        if e.errno == errno.ENOSPC:
            raise TransferError(
                f"no room for a {nbytes / 2**20:.1f} MiB KV cache in shared memory (/dev/shm); "
                "lower --kv-cache-memory or enlarge /dev/shm (docker: --shm-size)") from None
        raise
    segment.close()  # our own mapping (held by the tensor) replaces SharedMemory's
    cache = torch.frombuffer(mapping, dtype=dtype).view(
        num_blocks, shape.num_layers, 2, shape.block_size, shape.num_kv_heads, shape.head_dim)
    endpoint = KVEndpoint.for_cache("shm", cache, shm_name=segment.name)
    return cache, ShmSource(cache, endpoint, segment)


class ShmPuller:
    """Maps each prefill instance's segment once and copies rows straight out of it."""

    def __init__(self) -> None:
        self._caches: dict[KVEndpoint, torch.Tensor] = {}

    def _attach(self, endpoint: KVEndpoint) -> torch.Tensor:
        name = endpoint.shm_name
        cache = self._caches.get(endpoint)
        if cache is not None and _segment_exists(name):
            return cache
        # A closed or dead prefill instance's segment is unlinked: refuse rather than copy from
        # a mapping that nobody will ever update, nor free blocks in, again.
        self._caches.pop(endpoint, None)
        try:
            mapping = _map_segment(name)
        except FileNotFoundError:
            raise TransferError(f"shm segment {name!r} is gone: its prefill instance closed "
                                "or died") from None
        expected = endpoint.num_blocks * endpoint.bytes_per_block
        if len(mapping) != expected:
            raise TransferError(f"shm segment {name!r} holds {len(mapping)} bytes, its "
                                f"endpoint describes {expected}")
        cache = torch.frombuffer(mapping, dtype=endpoint.torch_dtype).view(
            endpoint.num_blocks, *endpoint.block_shape)
        self._caches[endpoint] = cache
        return cache

    def pull(self, endpoint: KVEndpoint, src_blocks: Sequence[int], dst_cache: torch.Tensor,
             dst_blocks: Sequence[int]) -> TransferStats:
        src, dst = check_pull("shm", endpoint, src_blocks, dst_cache, dst_blocks)
        start = time.perf_counter()
        src_cache = self._attach(endpoint)
        if not src:
            return TransferStats(0, time.perf_counter() - start)
        copy_rows(dst_cache, dst, src_cache, src)
        return TransferStats(len(src) * endpoint.bytes_per_block, time.perf_counter() - start)

    def fetch(self, endpoint: KVEndpoint, src_blocks: Sequence[int], region: Region
              ) -> tuple[torch.Tensor, TransferStats]:
        start = time.perf_counter()
        region.check(endpoint)
        src = check_block_ids(src_blocks, endpoint.num_blocks, "source")
        rows = region.of(self._attach(endpoint))[torch.tensor(src, dtype=torch.long)]
        return rows, TransferStats(region.nbytes(endpoint, len(src)), time.perf_counter() - start)

    def close(self) -> None:
        self._caches.clear()  # unmapped once no tensor views them; never unlinked from here


def attach_shm_cache(name: str, shape: KVCacheShape, num_blocks: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Map a cache another process of this instance allocated (a parallel worker's share),
    untracked: the allocating process owns and unlinks it."""
    mapping = _map_segment(name)
    expected = num_blocks * shape.bytes_per_block(dtype)
    if len(mapping) != expected:
        raise TransferError(f"shm segment {name!r} holds {len(mapping)} bytes, not {expected}")
    return torch.frombuffer(mapping, dtype=dtype).view(shape.tensor_shape(num_blocks))
