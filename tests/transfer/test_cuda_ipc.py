"""The cuda_ipc backend's checks, which need no GPU: its endpoint round-trips with its handle
bytes intact and refuses one without a handle; a CPU cache, a CPU destination, a source that is
gone, on another host or in this very process are refused with a clear error before any CUDA
call. The real GPU-to-GPU pull between two processes is in tests/cuda/test_cuda_paths.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import msgspec
import pytest
import torch

from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.transfer import BACKENDS, KVEndpoint, TransferError, make_puller, make_source
from distserve.transfer.base import Region, check_backend_device
from distserve.transfer.cuda_ipc import export_cuda_cache, process_alive

from .source_child import SECRET

SHAPE = KVCacheShape(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
BLOCK_BYTES = SHAPE.bytes_per_block(torch.bfloat16)
# What _share_cuda_() returns, made up: the handle and event bytes include NUL and high bytes.
IPC = dict(backend="cuda_ipc", num_blocks=8, num_layers=2, block_size=4, num_kv_heads=2,
           head_dim=8, dtype="bfloat16", host=socket.gethostname(), pid=os.getppid(),
           gpu="GPU-0000", ipc_device=0, ipc_handle=b"c\x00\xff" + bytes(range(61)),
           ipc_storage_bytes=8 * BLOCK_BYTES, ipc_offset=4096,
           ipc_ref_counter=b"/torch_123_456_0", ipc_ref_counter_offset=3,
           ipc_event=bytes(64), ipc_event_sync=True)


def test_the_backend_is_named_wherever_transfer_is_chosen():
    from distserve.cli import build_parser
    from distserve.cluster.deployment import TRANSFER_BACKENDS
    assert "cuda_ipc" in BACKENDS and set(TRANSFER_BACKENDS) == set(BACKENDS)
    args = build_parser().parse_args(["serve", "--prefill-instances", "1",
                                      "--decode-instances", "1", "--transfer", "cuda_ipc"])
    assert args.transfer == "cuda_ipc"


@pytest.mark.parametrize("codec", [msgspec.json, msgspec.msgpack])
def test_endpoint_round_trips_with_its_handle_bytes(codec):
    ep = KVEndpoint(**IPC)
    back = codec.decode(codec.encode(ep), type=KVEndpoint)
    assert back == ep and back.ipc_handle == IPC["ipc_handle"] and back.ipc_event_sync is True
    assert isinstance(back.ipc_ref_counter, bytes)
    # the control plane's path: to_builtins (bytes as base64) in a Ready message, then convert
    wire = msgspec.msgpack.encode({"endpoint": msgspec.to_builtins(ep)})
    assert msgspec.convert(msgspec.msgpack.decode(wire)["endpoint"], KVEndpoint) == ep
    assert str(ep.pid) in ep.where and ep.host in ep.where


@pytest.mark.parametrize("field,value,match", [
    ("ipc_handle", b"", "needs ipc_handle"),
    ("ipc_ref_counter", b"", "needs ipc_handle and ipc_ref_counter"),
    ("pid", 0, "pid >= 1, got host=.* pid=0"),
    ("host", "", "needs its host"),
    ("ipc_offset", -1, "ipc_offset .* must be >= 0"),
    ("ipc_storage_bytes", 123, "ipc_storage_bytes is 123, its layout needs"),
    ("ipc_event", b"", "ipc_event_sync needs ipc_event"),
])
def test_endpoint_refuses_a_cuda_ipc_endpoint_without_what_it_needs(field, value, match):
    with pytest.raises(ValueError, match=match):
        KVEndpoint(**{**IPC, field: value})
    wire = msgspec.msgpack.encode({**IPC, field: value})
    with pytest.raises(msgspec.ValidationError, match=match):
        msgspec.msgpack.decode(wire, type=KVEndpoint)


def test_a_cpu_cache_is_refused_naming_the_device():
    with pytest.raises(ValueError, match="cuda_ipc .* CUDA device, got device 'cpu'; use "
                                         "--transfer shm .* or tcp"):
        make_source("cuda_ipc", SHAPE, 4, torch.bfloat16, "cpu", secret=SECRET)
    with pytest.raises(ValueError, match="CUDA device, got device 'cpu'"):
        export_cuda_cache(allocate_kv_cache(SHAPE, 4, torch.bfloat16))
    # and shm, which refuses a GPU cache, now names cuda_ipc as the same-node GPU choice
    with pytest.raises(ValueError, match="use --transfer tcp, or --transfer cuda_ipc"):
        check_backend_device("shm", torch.device("cuda", 0))
    check_backend_device("cuda_ipc", torch.device("cuda", 1))


def test_a_deployment_on_cpu_refuses_cuda_ipc():
    from distserve.cluster.deployment import Deployment, PhaseSettings
    from distserve.config import EngineConfig
    with pytest.raises(ValueError, match="cuda_ipc .* device 'cpu'"):
        Deployment(EngineConfig(device="cpu"), "disaggregated", prefill=PhaseSettings(1),
                   decode=PhaseSettings(1), transfer="cuda_ipc")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()   # reaped: its pid names no process (until the kernel reuses it)
    return proc.pid


def test_liveness_of_the_exporting_process():
    assert process_alive(os.getpid()) and process_alive(os.getppid())
    assert not process_alive(_dead_pid())


@pytest.mark.parametrize("changes,match", [
    (dict(pid=None), "is gone: its prefill instance closed or died"),
    (dict(host="another-node"), "is not this node .* use --transfer tcp"),
    (dict(pid=os.getpid()), "is this process"),
])
def test_a_source_that_cannot_be_reached_is_refused_before_any_cuda_call(changes, match):
    if changes.get("pid", 1) is None:
        changes = {"pid": _dead_pid()}
    ep = KVEndpoint(**{**IPC, **changes})
    puller = make_puller("cuda_ipc", secret=SECRET)
    try:
        with pytest.raises(TransferError, match=match):
            puller.fetch(ep, [1, 2], Region(0, 2, 0, 2))
    finally:
        puller.close()


def test_pulls_into_a_cpu_cache_or_from_another_backend_are_refused():
    puller = make_puller("cuda_ipc", secret=SECRET)
    dst = allocate_kv_cache(SHAPE, 4, torch.bfloat16)
    with pytest.raises(TransferError, match="destination KV cache on a CUDA device, got 'cpu'"):
        puller.pull(KVEndpoint(**IPC), [1], dst, [0])
    shm = KVEndpoint(**{**IPC, "backend": "shm", "shm_name": "x"})
    with pytest.raises(TransferError, match="cuda_ipc puller cannot pull from a shm endpoint"):
        puller.pull(shm, [1], dst, [0])
    with pytest.raises(TransferError, match="cuda_ipc puller cannot pull from a shm endpoint"):
        puller.fetch(shm, [1], Region(0, 1, 0, 1))
    with pytest.raises(ValueError, match="source block id 8 is out of range"):
        puller.fetch(KVEndpoint(**IPC), [8], Region(0, 1, 0, 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_a_process_without_cuda_says_so():
    puller = make_puller("cuda_ipc", secret=SECRET)   # the source (our parent) is alive
    with pytest.raises(TransferError, match="needs CUDA in the pulling process"):
        puller.fetch(KVEndpoint(**IPC), [1], Region(0, 1, 0, 1))


def test_a_parallel_workers_cpu_share_is_refused_too():
    from distserve.kv.cache import KVShard
    from distserve.transfer.shares import KVLink, export_share
    share = KVShard(allocate_kv_cache(SHAPE, 4, torch.bfloat16), layer_start=2, head_start=1)
    with pytest.raises(ValueError, match="CUDA device, got device 'cpu'"):
        export_share(KVLink("cuda_ipc", SECRET, export=True), share)
