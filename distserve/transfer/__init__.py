"""Moving a request's KV blocks from its prefill instance to a decode instance, pulled by the
decode side: one interface, backends chosen by name.

  shm       same host: the prefill cache lives in POSIX shared memory; the decode side maps it.
  tcp       any host: the prefill instance serves block rows over one persistent connection.
  cuda_ipc  same node, GPUs: the decode side maps the prefill cache's GPU memory (CUDA IPC)
            and copies GPU to GPU, never through host memory.

Prefill side:  cache, source = make_source(backend, shape, num_blocks, dtype, secret=SECRET)
               publish source.endpoint (a msgspec struct) in a control message; source.close()
Decode side:   puller = make_puller(backend, secret=SECRET)
               stats = puller.pull(endpoint, src_blocks, my_cache, my_blocks); puller.close()
"""
from __future__ import annotations

import torch

from distserve.kv.cache import KVCacheShape
from distserve.transfer.base import (BACKENDS, InstanceEndpoint, KVEndpoint, KVPuller, KVSource,
                                     TransferError, TransferStats, check_backend,
                                     check_backend_device)
from distserve.transfer.cuda_ipc import CudaIpcPuller, CudaIpcSource, allocate_cuda_ipc_cache
from distserve.transfer.shm import ShmPuller, ShmSource, allocate_shm_cache
from distserve.transfer.tcp import TcpPuller, TcpSource, allocate_tcp_cache


def make_source(backend: str, shape: KVCacheShape, num_blocks: int, dtype: torch.dtype,
                device: torch.device | str = "cpu", *, secret: bytes, host: str = "127.0.0.1",
                port: int = 0) -> tuple[torch.Tensor, KVSource]:
    """Allocate a prefill instance's KV cache on `device` so that `backend` can export it
    (shm needs it in host memory, cuda_ipc on a CUDA device; tcp serves a GPU cache through
    host memory).

    host and port (tcp only) are where the transfer server listens; port 0 picks a free one.
    secret: the deployment's; a tcp puller must prove it knows it (shm segments are the
    user's alone, mode 0600).
    """
    check_backend(backend)
    check_backend_device(backend, torch.device(device))
    if backend == "shm":
        return allocate_shm_cache(shape, num_blocks, dtype)
    if backend == "cuda_ipc":
        return allocate_cuda_ipc_cache(shape, num_blocks, dtype, device)
    return allocate_tcp_cache(shape, num_blocks, dtype, host, port, device, secret=secret)


def make_puller(backend: str, *, secret: bytes, timeout: float = 30.0) -> KVPuller:
    """The decode side of `backend`; timeout (tcp only) bounds each pull, in seconds."""
    check_backend(backend)
    if backend == "shm":
        return ShmPuller()
    if backend == "cuda_ipc":
        return CudaIpcPuller()
    return TcpPuller(timeout=timeout, secret=secret)


__all__ = ["BACKENDS", "CudaIpcPuller", "CudaIpcSource", "InstanceEndpoint", "KVEndpoint",
           "KVPuller", "KVSource", "ShmPuller", "ShmSource", "TcpPuller", "TcpSource",
           "TransferError", "TransferStats", "allocate_cuda_ipc_cache", "allocate_shm_cache",
           "allocate_tcp_cache", "make_puller", "make_source"]
