"""KV moves between instances whose workers split it differently (TP by KV heads, PP by
layers): every destination share gets exactly its layers and heads, and the bytes moved are
the request's KV once."""
from __future__ import annotations

import msgspec
import pytest
import torch

from distserve.kv.cache import KVCacheShape, KVShard
from distserve.models.sharding import ModelDims, make_shard
from distserve.transfer import make_puller, make_source
from distserve.transfer.base import InstanceEndpoint, TransferError
from distserve.transfer.reshard import pull_resharded

from .source_child import SECRET

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 4, 4, 8, 4  # grouped-query: 8 query heads share 4 KV heads
DIMS = ModelDims(LAYERS, 8, KV_HEADS, 64, 100)
NUM_BLOCKS = 6


def _shares(tp: int, pp: int):
    for rank in range(tp * pp):
        s = make_shard(DIMS, tp, pp, rank)
        yield s.layers, s.kv_heads


def _source(backend: str, full: torch.Tensor, tp: int, pp: int):
    """A prefill instance of TP x PP workers holding `full`, each worker its share."""
    endpoints, sources = [], []
    for (l0, l1), (h0, h1) in _shares(tp, pp):
        shape = KVCacheShape(l1 - l0, h1 - h0, HEAD_DIM, BLOCK)
        cache, source = make_source(backend, shape, NUM_BLOCKS, full.dtype, secret=SECRET)
        cache.copy_(full[:, l0:l1, :, :, h0:h1])
        sources.append(source)
        endpoints.append(msgspec.structs.replace(source.endpoint, layer_start=l0, head_start=h0))
    # as it travels: inside a control message
    wire = msgspec.json.decode(msgspec.json.encode(InstanceEndpoint(endpoints)), type=InstanceEndpoint)
    return wire, sources


def _destination(tp: int, pp: int, dtype) -> list[KVShard]:
    return [KVShard(torch.zeros(NUM_BLOCKS, l1 - l0, 2, BLOCK, h1 - h0, HEAD_DIM, dtype=dtype), l0, h0)
            for (l0, l1), (h0, h1) in _shares(tp, pp)]


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize("src_layout,dst_layout", [((2, 1), (1, 1)), ((1, 1), (2, 1)),
                                                   ((1, 2), (2, 1)), ((2, 2), (4, 1)),
                                                   ((2, 1), (2, 1)), ((1, 4), (1, 1))])
def test_each_share_gets_exactly_its_layers_and_heads(backend, src_layout, dst_layout):
    torch.manual_seed(0)
    full = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    source, owners = _source(backend, full, *src_layout)
    shards = _destination(*dst_layout, torch.bfloat16)
    puller = make_puller(backend, timeout=5, secret=SECRET)
    try:
        src_blocks, dst_blocks = [3, 1, 4], [0, 5, 2]
        stats = pull_resharded(puller, source, src_blocks, shards, dst_blocks)
        whole_block = full[0].numel() * full.element_size()
        assert stats.nbytes == len(src_blocks) * whole_block   # the request's KV, once
        for shard in shards:
            l0, h0 = shard.layer_start, shard.head_start
            l1, h1 = l0 + shard.cache.shape[1], h0 + shard.cache.shape[4]
            for s, d in zip(src_blocks, dst_blocks):
                assert torch.equal(shard.cache[d], full[s, l0:l1, :, :, h0:h1])
            untouched = [b for b in range(NUM_BLOCKS) if b not in dst_blocks]
            assert not shard.cache[untouched].any()
    finally:
        puller.close()
        for o in owners:
            o.close()


def test_a_source_that_lacks_some_heads_is_refused():
    full = torch.zeros(NUM_BLOCKS, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM)
    source, owners = _source("shm", full, 2, 1)
    half = InstanceEndpoint(source.shards[:1])   # only KV heads 0-1
    puller = make_puller("shm", secret=SECRET)
    try:
        with pytest.raises(TransferError, match="do not cover"):
            pull_resharded(puller, half, [0], _destination(1, 1, torch.float32), [1])
    finally:
        puller.close()
        for o in owners:
            o.close()
