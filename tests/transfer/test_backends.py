"""Both backends in one process: exact bytes, untouched neighbours, clear errors."""
from __future__ import annotations

import hashlib
import hmac
import random
import socket
import struct
import threading
import time

import msgspec
import pytest
import torch

from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.transfer import KVEndpoint, TransferError, make_puller, make_source
from distserve.transfer.tcp import PullReply, PullRequest

from .source_child import SECRET

pytestmark = pytest.mark.timeout(30)

GQA = KVCacheShape(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4)  # 8 q heads share 2


@pytest.fixture(params=["shm", "tcp"])
def backend(request):
    return request.param


@pytest.fixture
def exported(backend):
    cache, source = make_source(backend, GQA, 32, torch.bfloat16, secret=SECRET)
    cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(0)))
    puller = make_puller(backend, timeout=5, secret=SECRET)
    yield cache, source, puller
    puller.close()
    source.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_pull_moves_exact_bytes_into_other_block_ids(backend, dtype):
    cache, source = make_source(backend, GQA, 40, dtype, secret=SECRET)
    puller = make_puller(backend, timeout=5, secret=SECRET)
    try:
        cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(1)))
        rng = random.Random(2)
        src = rng.sample(range(40), 11)  # non-contiguous, unordered
        dst = rng.sample(range(30), 11)
        dst_cache = allocate_kv_cache(GQA, 30, dtype)
        dst_cache.fill_(7)
        before = dst_cache.clone()
        stats = puller.pull(source.endpoint, src, dst_cache, dst)
        assert torch.equal(dst_cache[dst], cache[src])
        others = [b for b in range(30) if b not in dst]
        assert torch.equal(dst_cache[others], before[others])
        assert stats.nbytes == 11 * GQA.bytes_per_block(dtype)
        assert stats.seconds > 0
        again = puller.pull(source.endpoint, src[:3], dst_cache, dst[:3])  # reuses the mapping
        assert again.nbytes == 3 * GQA.bytes_per_block(dtype)
    finally:
        puller.close()
        source.close()


def test_empty_pull_moves_nothing(exported):
    cache, source, puller = exported
    assert puller.pull(source.endpoint, [], allocate_kv_cache(GQA, 4, cache.dtype), []).nbytes == 0


def test_bad_block_id_is_named_and_puller_stays_usable(exported):
    cache, source, puller = exported
    dst_cache = allocate_kv_cache(GQA, 8, cache.dtype)
    with pytest.raises(TransferError, match="source block id 32 is out of range"):
        puller.pull(source.endpoint, [1, 32], dst_cache, [0, 1])
    with pytest.raises(TransferError, match="destination block id -1 is out of range"):
        puller.pull(source.endpoint, [1], dst_cache, [-1])
    with pytest.raises(TransferError, match="repeat"):
        puller.pull(source.endpoint, [1, 2], dst_cache, [3, 3])
    with pytest.raises(TransferError, match="2 source blocks into 1"):
        puller.pull(source.endpoint, [1, 2], dst_cache, [3])
    puller.pull(source.endpoint, [5], dst_cache, [6])
    assert torch.equal(dst_cache[6], cache[5])


@pytest.mark.parametrize("mismatch", ["heads", "dtype"])
def test_mismatched_caches_are_refused(exported, mismatch):
    cache, source, puller = exported
    if mismatch == "heads":
        other = KVCacheShape(num_layers=3, num_kv_heads=4, head_dim=8, block_size=4)
        dst_cache, match = allocate_kv_cache(other, 8, cache.dtype), "layouts differ"
    else:
        dst_cache, match = allocate_kv_cache(GQA, 8, torch.float32), "dtypes differ"
    with pytest.raises(TransferError, match=match):
        puller.pull(source.endpoint, [1], dst_cache, [0])


def test_puller_refuses_the_other_backends_endpoint(exported, backend):
    cache, source, _ = exported
    other = make_puller("tcp" if backend == "shm" else "shm", secret=SECRET)
    with pytest.raises(TransferError, match=f"cannot pull from a {backend} endpoint"):
        other.pull(source.endpoint, [0], allocate_kv_cache(GQA, 2, cache.dtype), [0])


def _frame(msg) -> bytes:
    body = msgspec.msgpack.encode(msg)
    return struct.pack("!I", len(body)) + body


def _read_frame(f, kind):
    (n,) = struct.unpack("!I", f.read(4))
    return msgspec.msgpack.decode(f.read(n), type=kind)


def _handshake(s, f, endpoint, secret: bytes) -> None:
    """What a puller does on connect: read the greeting and answer its challenge."""
    assert _read_frame(f, KVEndpoint) == endpoint
    challenge = f.read(16)
    s.sendall(hmac.new(secret, b"distserve-kv:" + challenge, hashlib.sha256).digest())


def test_tcp_server_refuses_bad_ids_and_keeps_the_connection():
    cache, source = make_source("tcp", GQA, 8, torch.float32, secret=SECRET)
    cache.copy_(torch.arange(cache.numel(), dtype=torch.float32).view(cache.shape))
    try:
        with socket.create_connection(("127.0.0.1", source.endpoint.port), timeout=5) as s:
            f = s.makefile("rb")
            _handshake(s, f, source.endpoint, SECRET)
            s.sendall(_frame(PullRequest(1, [2, 99])))
            bad = _read_frame(f, PullReply)
            assert (bad.request_id, bad.ok, bad.nbytes) == (1, False, 0)
            assert "block id 99 is out of range" in bad.error
            s.sendall(struct.pack("!I", 3) + b"\xc1\xc1\xc1")  # not msgpack
            assert not _read_frame(f, PullReply).ok
            s.sendall(_frame(PullRequest(2, [3, 1])))
            good = _read_frame(f, PullReply)
            assert good.ok and good.nbytes == 2 * GQA.bytes_per_block(torch.float32)
            got = torch.frombuffer(bytearray(f.read(good.nbytes)), dtype=torch.float32)
            assert torch.equal(got.view(2, *cache.shape[1:]), cache[[3, 1]])
    finally:
        source.close()


@pytest.mark.parametrize("answer", ["wrong secret", "pull at once"])
def test_a_stranger_without_the_secret_reads_no_kv(answer):
    cache, source = make_source("tcp", GQA, 8, torch.float32, secret=SECRET)
    cache.fill_(7.0)
    try:
        with socket.create_connection(("127.0.0.1", source.endpoint.port), timeout=5) as s:
            f = s.makefile("rb")
            if answer == "wrong secret":
                _handshake(s, f, source.endpoint, b"a guess at the secret, wrong")
                s.sendall(_frame(PullRequest(1, [0, 1])))
                try:
                    rest = f.read()
                except ConnectionResetError:  # hung up with our request unread
                    rest = b""
                assert rest == b""  # not one KV byte
            else:  # a pull request where the answer should be, then nothing
                s.sendall(_frame(PullRequest(1, [0, 1])))
                s.shutdown(socket.SHUT_WR)
                greeting = 4 + len(msgspec.msgpack.encode(source.endpoint)) + 16
                assert len(f.read()) == greeting  # the greeting and challenge, no KV byte
        deadline = time.monotonic() + 5
        while source.num_refused < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.num_refused == 1
        # and the deployment's own pullers still get their blocks
        puller = make_puller("tcp", timeout=5, secret=SECRET)
        dst = allocate_kv_cache(GQA, 2, torch.float32)
        puller.pull(source.endpoint, [0], dst, [1])
        assert torch.equal(dst[1], cache[0])
        puller.close()
    finally:
        source.close()


def _silent_server(send_hello_of=None):
    """A listener that accepts (and maybe greets) but never answers a pull."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run():
        conn, _ = listener.accept()
        if send_hello_of is not None:
            conn.sendall(_frame(send_hello_of))
        stop.wait(10)
        conn.close()

    threading.Thread(target=run, daemon=True).start()
    return listener, stop


@pytest.mark.parametrize("greets", [False, True])
def test_silent_source_times_out_instead_of_hanging(greets):
    """Silent before its greeting, or after it: either way the pull ends within its timeout."""
    layout = KVEndpoint.for_cache("tcp", allocate_kv_cache(GQA, 8, torch.float32),
                                  host="127.0.0.1", port=1)
    listener, stop = _silent_server(send_hello_of=layout if greets else None)
    endpoint = msgspec.structs.replace(layout, port=listener.getsockname()[1])
    puller = make_puller("tcp", timeout=0.5, secret=SECRET)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="timed out"):
            puller.pull(endpoint, [1], allocate_kv_cache(GQA, 2, torch.float32), [0])
        assert time.monotonic() - t0 < 3
    finally:
        puller.close()
        stop.set()
        listener.close()


def test_refused_connection_is_a_transfer_error():
    _, source = make_source("tcp", GQA, 8, torch.float32, secret=SECRET)
    source.close()
    with pytest.raises(TransferError, match="failed"):
        make_puller("tcp", timeout=2, secret=SECRET).pull(source.endpoint, [1],
                                           allocate_kv_cache(GQA, 2, torch.float32), [0])


def test_non_integer_block_id_is_named(exported):
    cache, source, puller = exported
    with pytest.raises(TransferError, match=r"block ids must be integers, got \[1.5\]"):
        puller.pull(source.endpoint, [1.5], allocate_kv_cache(GQA, 2, cache.dtype), [0])


def test_closed_shm_source_is_gone():
    _, source = make_source("shm", GQA, 4, torch.float32, secret=SECRET)
    source.close()
    with pytest.raises(TransferError, match="is gone"):
        make_puller("shm", secret=SECRET).pull(source.endpoint, [0], allocate_kv_cache(GQA, 2, torch.float32), [0])


def test_stale_tcp_endpoint_is_refused():
    cache, source = make_source("tcp", GQA, 8, torch.float32, secret=SECRET)
    puller = make_puller("tcp", timeout=5, secret=SECRET)
    try:
        stale = msgspec.structs.replace(source.endpoint, num_blocks=64)  # another layout
        with pytest.raises(TransferError, match="stale endpoint"):
            puller.pull(stale, [0], allocate_kv_cache(GQA, 2, cache.dtype), [0])
        puller.pull(source.endpoint, [0], allocate_kv_cache(GQA, 2, cache.dtype), [1])
    finally:
        puller.close()
        source.close()


def test_busy_port_is_named():
    _, first = make_source("tcp", GQA, 2, torch.float32, secret=SECRET)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.endpoint.port}"):
            make_source("tcp", GQA, 2, torch.float32, port=first.endpoint.port, secret=SECRET)
    finally:
        first.close()
