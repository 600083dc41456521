"""Loads what every instance needs: model, tokenizer and a KV cache sized from the budget."""
from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from distserve.config import EngineConfig
from distserve.engine.model_runner import ModelRunner
from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.models import paged_kernel
from distserve.models.loader import (build_model, default_device, find_model,
                                     load_tokenizer_for, resolve_dtype)

log = logging.getLogger(__name__)

CacheAllocator = Callable[[KVCacheShape, int, torch.dtype, torch.device], torch.Tensor]


@dataclass
class Worker:
    config: EngineConfig
    model_name: str
    model: nn.Module
    tokenizer: Any
    runner: ModelRunner
    num_kv_blocks: int
    max_model_len: int
    eos_token_ids: set[int]
    dtype: torch.dtype
    device: torch.device


def load_worker(config: EngineConfig, allocate_cache: CacheAllocator = allocate_kv_cache) -> Worker:
    """`allocate_cache(shape, num_blocks, dtype, device)` lets a transfer backend own the
    cache memory (shared memory for the same-host path)."""
    device = torch.device(config.device) if config.device else default_device()
    prepare_device(config, device)
    dtype = resolve_dtype(config.dtype, device)
    source = find_model(config.model)
    model = build_model(source, dtype, device)
    tokenizer = load_tokenizer_for(source)
    shape = KVCacheShape(model.num_layers, model.num_kv_heads, model.head_dim, config.block_size)
    num_blocks = config.num_kv_blocks or shape.num_blocks_for(
        int(config.kv_cache_memory_gib * 2**30), dtype)
    kv_cache = allocate_cache(shape, num_blocks, dtype, device)
    max_len = config.max_model_len or model.max_positions
    if max_len > model.max_positions:
        raise ValueError(f"max_model_len {max_len} exceeds the model's "
                         f"{model.max_positions} positions")
    log.info("%s: %d KV blocks of %d tokens (%.0f MiB)", source.name, num_blocks,
             config.block_size, kv_cache.numel() * kv_cache.element_size() / 2**20)
    runner = ModelRunner(model, kv_cache, config.block_size, device)
    runner.warm_up(min(config.max_num_batched_tokens, max_len - 1, num_blocks * config.block_size - 1))
    if device.type == "cuda" and not config.enforce_eager and config.num_workers == 1:
        captured = runner.use_graphs(max_len, config.max_num_seqs)
        log.info("decode steps %s", "replayed from CUDA graphs" if captured else
                 "run eagerly: no Triton paged attention here, or the capture failed (above)")
    return Worker(config, source.name, model, tokenizer, runner,
                  num_blocks, max_len, _eos_ids(source.hf_config, tokenizer), dtype, device)


def prepare_device(config: EngineConfig, device: torch.device) -> None:
    """Threads, seed, allocator and kernels, before a worker loads its model."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)   # graphs, streams and Triton launches use the current one
    if device.type == "cpu":
        reuse_freed_memory()
        paged_kernel.kernel_available()  # built (once per machine) before the first request


def reuse_freed_memory() -> None:
    """Have glibc serve large tensors from its heap and keep freed memory for reuse.

    By default each allocation over 32 MB (a prefill's activations) is a fresh mmap whose
    pages the kernel faults in and zeroes, unmapped again on free. On the benchmark machine
    that made a 2048-token prefill of the 1.1 GB model take 2.1 to 3.4 s instead of 1.4 to
    1.5 s. (PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for the same reason;
    this needs neither.) Freed memory stays with the process, as a GPU caching allocator's
    does; at most 1 GiB of it above the heap's last live block.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)


def _eos_ids(hf_config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (hf_config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
