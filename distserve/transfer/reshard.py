"""Pulling a request's KV between instances whose workers split it differently.

A prefill instance of TP x PP workers holds each block as shares (a worker's layers x its KV
heads); a decode instance may split it another way. Every destination share fetches from each
source share only the region (layers x KV heads) it owns (over the instance's backend: shm,
tcp or cuda_ipc, whose regions stay on the GPU), so the bytes moved are the request's KV, once,
whatever the two layouts and whichever worker pulls. Same layout on both sides with one worker
each: a plain pull, no staging.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from distserve.kv.cache import KVShard
from distserve.transfer.base import (InstanceEndpoint, KVEndpoint, KVPuller, Region,
                                     TransferError, TransferStats, dtype_name)


def _span(start: int, size: int) -> tuple[int, int]:
    return start, start + size


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def _check_compatible(src: KVEndpoint, dst: KVShard) -> None:
    _, _, _, block_size, _, head_dim = dst.cache.shape
    if (src.block_size, src.head_dim) != (block_size, head_dim):
        raise TransferError(f"KV layouts differ: source blocks of {src.block_size} tokens x head "
                            f"dim {src.head_dim} at {src.where}, destination {block_size} x "
                            f"{head_dim}")
    if src.dtype != dtype_name(dst.cache.dtype):
        raise TransferError(f"KV cache dtypes differ: destination {dtype_name(dst.cache.dtype)}, "
                            f"source at {src.where} {src.dtype}")


def plan_regions(source: InstanceEndpoint, shards: list[KVShard]):
    """For each source share, [(destination share, layers, heads)] it fills; refuses layouts
    that leave part of a destination share uncovered (different models or a broken source)."""
    regions = []
    covered = [0] * len(shards)
    for ep in source.shards:
        mine = []
        for i, dst in enumerate(shards):
            _check_compatible(ep, dst)
            layers = _overlap(_span(ep.layer_start, ep.num_layers),
                              _span(dst.layer_start, dst.cache.shape[1]))
            heads = _overlap(_span(ep.head_start, ep.num_kv_heads),
                             _span(dst.head_start, dst.cache.shape[4]))
            if layers and heads:
                mine.append((i, layers, heads))
                covered[i] += (layers[1] - layers[0]) * (heads[1] - heads[0])
        regions.append(mine)
    for i, dst in enumerate(shards):
        if covered[i] != dst.cache.shape[1] * dst.cache.shape[4]:
            raise TransferError(f"the source's KV shares do not cover the destination's layers "
                                f"{dst.layer_start}..{dst.layer_start + dst.cache.shape[1] - 1} "
                                f"x KV heads {dst.head_start}..{dst.head_start + dst.cache.shape[4] - 1}"
                                " exactly once")
    return regions


def _is_direct(source: InstanceEndpoint, shards: list[KVShard]) -> bool:
    if len(source.shards) != 1 or len(shards) != 1:
        return False
    ep, dst = source.shards[0], shards[0]
    return ((ep.layer_start, ep.head_start, ep.num_layers, ep.num_kv_heads)
            == (dst.layer_start, dst.head_start, dst.cache.shape[1], dst.cache.shape[4]))


def pull_resharded(puller: KVPuller, source: InstanceEndpoint, src_blocks: Sequence[int],
                   shards: list[KVShard], dst_blocks: Sequence[int]) -> TransferStats:
    """Copies blocks `src_blocks` of the source instance into `dst_blocks` of every
    destination share."""
    if _is_direct(source, shards):
        return puller.pull(source.shards[0], src_blocks, shards[0].cache, dst_blocks)
    if len(src_blocks) != len(dst_blocks):
        raise TransferError(f"pull of {len(src_blocks)} source blocks into {len(dst_blocks)} "
                            "destination blocks")
    start = time.perf_counter()
    regions = plan_regions(source, shards)
    nbytes = 0
    index = {}
    for ep, fills in zip(source.shards, regions):
        for i, (l0, l1), (h0, h1) in fills:
            dst = shards[i]
            rows, stats = puller.fetch(ep, src_blocks, Region(
                l0 - ep.layer_start, l1 - ep.layer_start, h0 - ep.head_start, h1 - ep.head_start))
            nbytes += stats.nbytes
            device = dst.cache.device
            if device not in index:
                index[device] = torch.tensor(list(dst_blocks), device=device)
            view = dst.cache[:, l0 - dst.layer_start:l1 - dst.layer_start, :, :,
                             h0 - dst.head_start:h1 - dst.head_start]
            view.index_copy_(0, index[device], rows.to(device))
    return TransferStats(nbytes, time.perf_counter() - start)
