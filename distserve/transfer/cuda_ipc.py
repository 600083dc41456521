"""Same-node KV transfer between GPUs through CUDA IPC: GPU to GPU, never via host memory.

shm needs the cache in host memory and tcp stages a GPU cache through pinned host memory and
a socket; on one node a decode instance can instead map the prefill instance's GPU memory.
The prefill cache stays where its engine allocated it and is exported once with torch's own
CUDA IPC handle: the values `UntypedStorage._share_cuda_()` returns (what torch.multiprocessing
would pickle), carried as plain fields of the endpoint, so it travels in msgpack control
messages. A decode instance opens it once (`UntypedStorage._new_shared_cuda`) on its own GPU,
as device memory its kernels read directly (the same GPU, or the prefill's over NVLink or PCIe
peer access, which the open enables), so a pull is one gather and one index_copy_ there.
Both calls are torch private APIs; their argument order and types follow torch 2.13's
torch/multiprocessing/reductions.py and torch/csrc/StorageSharing.cpp.

Why reading another process's memory is safe here:
- the blocks pulled are held by the prefill instance until the pull returns, and their KV was
  complete before the first token left it (sampling waits for the GPU); a pull waits for its
  own copy before it returns, so the blocks may be freed as soon as it is confirmed.
- the memory of a process that is gone must not be read: each pull checks, before and after
  its copy, that the exporting process is alive (its pid, on this node's name), as shm
  refuses an unlinked segment.
- the cache is exported once and lives as long as the prefill process. torch counts one
  reader per export; several decode instances releasing their mapping take that count below
  zero, which only matters when the prefill process frees its cache, i.e. when it ends.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence

import torch

from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.transfer.base import (KVEndpoint, Region, TransferError, TransferStats,
                                     check_block_ids, check_cache, check_pull, copy_rows)


def _gpu_uuid(index: int) -> str:
    try:
        return str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError):   # only for messages
        return ""


def export_cuda_cache(cache: torch.Tensor, **where) -> KVEndpoint:
    """The cuda_ipc endpoint of a CUDA cache tensor that is a whole storage (as a cache the
    engine allocates is); `where` adds a parallel worker's layer_start and head_start."""
    check_cache(cache)
    if cache.device.type != "cuda":
        raise ValueError(f"the cuda_ipc KV transfer backend exports a KV cache on a CUDA "
                         f"device, got device {str(cache.device)!r}; use shm or tcp")
    storage = cache.untyped_storage()
    if cache.storage_offset() != 0 or storage.nbytes() != cache.nbytes:
        raise ValueError(f"a KV cache exported over cuda_ipc must be its whole storage, not a "
                         f"view: storage offset {cache.storage_offset()}, {storage.nbytes()} "
                         f"bytes of storage for {cache.nbytes} bytes of cache")
    try:
        (device, handle, size_bytes, offset_bytes, ref_counter, ref_counter_offset, event,
         event_sync) = storage._share_cuda_()
    except RuntimeError as e:   # e.g. an allocator backend that cannot export IPC handles
        raise ValueError(f"cannot export the KV cache on {cache.device} as a CUDA IPC handle "
                         f"({e}); check PYTORCH_CUDA_ALLOC_CONF, or use --transfer tcp") from e
    return KVEndpoint.for_cache(
        "cuda_ipc", cache, host=socket.gethostname(), pid=os.getpid(), gpu=_gpu_uuid(device),
        ipc_device=device, ipc_handle=handle, ipc_storage_bytes=size_bytes,
        ipc_offset=offset_bytes, ipc_ref_counter=ref_counter,
        ipc_ref_counter_offset=ref_counter_offset, ipc_event=event,
        ipc_event_sync=bool(event_sync), **where)


class CudaIpcSource:
    """Publishes a CUDA cache's IPC handle. Nothing serves and nothing is owned: the engine
    keeps the memory, which lives until this process drops it or ends."""

    def __init__(self, cache: torch.Tensor, **where) -> None:
        self.cache = cache
        self.endpoint = export_cuda_cache(cache, **where)

    def close(self) -> None:
        pass   # the handle dies with the memory; pullers notice when this process is gone


def allocate_cuda_ipc_cache(shape: KVCacheShape, num_blocks: int, dtype: torch.dtype,
                            device: torch.device | str) -> tuple[torch.Tensor, CudaIpcSource]:
    """Allocate a prefill instance's KV cache (zeros) on a CUDA device and export it."""
    if num_blocks < 1:
        raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
    cache = allocate_kv_cache(shape, num_blocks, dtype, device=device)
    return cache, CudaIpcSource(cache)


def process_alive(pid: int) -> bool:
    """Whether process `pid` (of this node) still runs: a zombie's GPU memory is already
    released, so it counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True   # no /proc here: kill() found it
    return state not in (b"Z", b"X")


class CudaIpcPuller:
    """Opens each prefill instance's cache once, on the GPU of its first pull (or, for a
    fetch, this process's current device), and copies rows GPU to GPU. Not thread-safe."""

    def __init__(self) -> None:
        self._caches: dict[KVEndpoint, torch.Tensor] = {}
        self._host = socket.gethostname()

    def _check_source(self, endpoint: KVEndpoint) -> None:
        if endpoint.backend != "cuda_ipc":
            raise TransferError(f"a cuda_ipc puller cannot pull from a {endpoint.backend} "
                                f"endpoint ({endpoint.where})")
        if endpoint.host != self._host:
            raise TransferError(f"{endpoint.where} is not this node ({self._host}): cuda_ipc "
                                "reaches only instances on one node; use --transfer tcp")
        if endpoint.pid == os.getpid():
            raise TransferError(f"{endpoint.where} is this process: CUDA IPC opens only "
                                "another process's memory")
        if not process_alive(endpoint.pid):
            self._caches.pop(endpoint, None)
            raise TransferError(f"{endpoint.where} is gone: its prefill instance closed or died")

    def _open(self, endpoint: KVEndpoint, device: torch.device | None) -> torch.Tensor:
        self._check_source(endpoint)
        cache = self._caches.get(endpoint)
        if cache is not None:
            return cache
        if not torch.cuda.is_available():
            raise TransferError("the cuda_ipc KV transfer backend needs CUDA in the pulling "
                                "process, and this one has none; use shm or tcp")
        torch.cuda.init()
        index = device.index if device is not None and device.index is not None \
            else torch.cuda.current_device()
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                int(index), bytes(endpoint.ipc_handle), int(endpoint.ipc_storage_bytes),
                int(endpoint.ipc_offset), bytes(endpoint.ipc_ref_counter),
                int(endpoint.ipc_ref_counter_offset), bytes(endpoint.ipc_event),
                bool(endpoint.ipc_event_sync))
        except RuntimeError as e:
            raise TransferError(f"cannot open {endpoint.where} on cuda:{index}: {e}. The two "
                                "GPUs need peer access (NVLink or PCIe P2P), else use "
                                "--transfer tcp") from e
        cache = torch.empty(0, dtype=endpoint.torch_dtype, device=storage.device).set_(
            storage).view(endpoint.num_blocks, *endpoint.block_shape)
        self._caches[endpoint] = cache
        return cache

    def _finish(self, endpoint: KVEndpoint, device: torch.device) -> None:
        """Wait for the copy, then make sure its source lived through it."""
        torch.cuda.current_stream(device).synchronize()
        self._check_source(endpoint)

    def pull(self, endpoint: KVEndpoint, src_blocks: Sequence[int], dst_cache: torch.Tensor,
             dst_blocks: Sequence[int]) -> TransferStats:
        src, dst = check_pull("cuda_ipc", endpoint, src_blocks, dst_cache, dst_blocks)
        if dst_cache.device.type != "cuda":
            raise TransferError(f"a cuda_ipc pull needs the destination KV cache on a CUDA "
                                f"device, got {str(dst_cache.device)!r}; use shm or tcp")
        start = time.perf_counter()
        src_cache = self._open(endpoint, dst_cache.device)
        if not src:
            return TransferStats(0, time.perf_counter() - start)
        copy_rows(dst_cache, dst, src_cache, src)
        self._finish(endpoint, dst_cache.device)
        return TransferStats(len(src) * endpoint.bytes_per_block, time.perf_counter() - start)

    def fetch(self, endpoint: KVEndpoint, src_blocks: Sequence[int], region: Region
              ) -> tuple[torch.Tensor, TransferStats]:
        """The region's rows, on this process's current CUDA device."""
        start = time.perf_counter()
        region.check(endpoint)
        src = check_block_ids(src_blocks, endpoint.num_blocks, "source")
        cache = self._open(endpoint, None)
        rows = region.of(cache)[torch.tensor(src, dtype=torch.long, device=cache.device)]
        self._finish(endpoint, cache.device)
        return rows, TransferStats(region.nbytes(endpoint, len(src)), time.perf_counter() - start)

    def close(self) -> None:
        self._caches.clear()   # unmapped once no tensor views them
