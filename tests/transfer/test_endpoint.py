"""The endpoint travels in control messages: it must round-trip and refuse nonsense."""
from __future__ import annotations

import msgspec
import pytest
import torch

from distserve.kv.cache import KVCacheShape
from distserve.transfer import KVEndpoint, TransferStats, make_puller, make_source

from .source_child import SECRET

TCP = dict(backend="tcp", num_blocks=8, num_layers=2, block_size=4, num_kv_heads=2,
           head_dim=8, dtype="bfloat16", host="127.0.0.1", port=5555)


@pytest.mark.parametrize("codec", [msgspec.json, msgspec.msgpack])
def test_endpoint_round_trips(codec):
    ep = KVEndpoint(**TCP)
    assert codec.decode(codec.encode(ep), type=KVEndpoint) == ep
    assert ep.block_shape == (2, 2, 4, 2, 8)
    assert ep.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 2


@pytest.mark.parametrize("field,value,match", [
    ("backend", "nccl", "unknown KV transfer backend 'nccl'"),
    ("dtype", "int8", "unsupported KV cache dtype 'int8'"),
    ("head_dim", 0, "head_dim must be >= 1, got 0"),
    ("port", 0, "port in 1..65535"),
])
def test_endpoint_refuses_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        KVEndpoint(**{**TCP, field: value})
    wire = msgspec.json.encode({**TCP, field: value})
    with pytest.raises(msgspec.ValidationError, match=match):
        msgspec.json.decode(wire, type=KVEndpoint)


def test_shm_endpoint_needs_a_segment_name():
    with pytest.raises(ValueError, match="shm_name"):
        KVEndpoint(**{**TCP, "backend": "shm"})


def test_factories_name_the_bad_backend():
    shape = KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=4, block_size=2)
    with pytest.raises(ValueError, match="'rdma'"):
        make_source("rdma", shape, 4, torch.float32, secret=SECRET)
    with pytest.raises(ValueError, match="'rdma'"):
        make_puller("rdma", secret=SECRET)


def test_stats_report_bandwidth():
    assert TransferStats(nbytes=2_000_000_000, seconds=2.0).gbps == 1.0
    assert TransferStats(nbytes=0, seconds=0.0).gbps == 0.0
