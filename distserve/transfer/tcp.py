"""KV transfer over TCP, for a decode instance on another host (or any host).

The prefill instance runs a small server thread; each decode instance keeps one persistent
connection to it and sends pull requests on it. Wire format, both ways: a 4-byte big-endian
length, a msgpack header, then (replies only) the raw bytes of cache[blocks], sent from the
cache itself and received into the destination blocks themselves (via a staging buffer when
a cache is on a GPU).
On connect the server first sends its endpoint, so a stale endpoint (a port now used by
another instance) fails loudly, then a random challenge: the client must answer with its
HMAC under the deployment's secret before anything is served, so a process outside the
deployment reads no KV bytes. Connections are capped. Never pickles; never trusts a block id
it is sent.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Callable, TypeVar

import msgspec
import numpy as np
import torch

from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.transfer.base import (KVEndpoint, Region, TransferError, TransferStats,
                                     byte_rows, check_block_ids, check_cache, check_pull,
                                     copy_rows)

_LENGTH = struct.Struct("!I")
_MAX_HEADER = 16 << 20
_CHALLENGE_BYTES, _ANSWER_BYTES = 16, 32
_HANDSHAKE_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64  # decode instances per prefill instance: far more than any deployment


def _answer(secret: bytes, challenge: bytes) -> bytes:
    return hmac.new(secret, b"distserve-kv:" + challenge, hashlib.sha256).digest()
_encoder = msgspec.msgpack.Encoder()
T = TypeVar("T")


class PullRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: int
    block_ids: list[int]
    region: Region | None = None   # only these layers x KV heads (None: whole blocks)


class PullReply(msgspec.Struct, frozen=True):
    request_id: int
    ok: bool
    nbytes: int = 0
    error: str = ""


def _send_header(sock: socket.socket, msg: msgspec.Struct) -> None:
    body = _encoder.encode(msg)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None,
               eof_ok: bool = False) -> bool:
    """Fill view; False on EOF before its first byte if eof_ok, else ConnectionError."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0 and eof_ok:
                return False
            raise ConnectionError(f"connection closed after {got} of {len(view)} bytes")
        got += n
    return True


def _recv_header(sock: socket.socket, kind: type[T], deadline: float | None,
                 eof_ok: bool = False) -> T | None:
    prefix = bytearray(_LENGTH.size)
    if not _recv_into(sock, memoryview(prefix), deadline, eof_ok):
        return None
    (length,) = _LENGTH.unpack(prefix)
    if length > _MAX_HEADER:
        raise ConnectionError(f"header of {length} bytes exceeds the {_MAX_HEADER} byte limit")
    body = bytearray(length)
    _recv_into(sock, memoryview(body), deadline)
    return msgspec.msgpack.decode(body, type=kind)


class TcpSource:
    """Serves pulls of one cache's blocks; one thread per connected decode instance.

    The blocks being pulled are held by the prefill instance until the decode instance
    confirms, so reading them while the engine writes other blocks is safe.
    """

    def __init__(self, cache: torch.Tensor, host: str = "127.0.0.1", port: int = 0, *,
                 secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the KV transfer secret has at least 16 bytes")
        self.cache = cache
        self._secret = secret
        check_cache(cache)  # before binding, so a bad cache leaks no socket
        try:
            self._listener = socket.create_server((host, port))
        except OSError as e:
            raise OSError(e.errno, f"KV transfer server cannot listen on {host}:{port}: "
                          f"{e.strerror}") from e
        self._listener.settimeout(0.2)  # so the accept loop notices close() promptly
        advertised = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        self.endpoint = KVEndpoint.for_cache("tcp", cache, host=advertised,
                                             port=self._listener.getsockname()[1])
        self._hello = _encoder.encode(self.endpoint)
        self.num_refused = 0  # connections that failed the handshake
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"kv-tcp-source:{self.endpoint.port}")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"kv-tcp-conn:{self.endpoint.port}")
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                if len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns[conn] = thread
            thread.start()

    def _rows(self, ids: list[int], region: Region | None) -> list[np.ndarray]:
        """The bytes of cache[ids] (of its region): on CPU whole blocks straight from the
        cache, no copy."""
        if region is None and self.cache.device.type == "cpu":
            table = byte_rows(self.cache)
            return [table[b] for b in ids]
        index = torch.tensor(ids, device=self.cache.device)
        rows = (self.cache if region is None else region.of(self.cache))[index]
        return [byte_rows(rows.contiguous().cpu()).reshape(-1)]

    def _authenticated(self, conn: socket.socket) -> bool:
        challenge = secrets.token_bytes(_CHALLENGE_BYTES)
        conn.sendall(_LENGTH.pack(len(self._hello)) + self._hello + challenge)
        answer = bytearray(_ANSWER_BYTES)
        try:
            _recv_into(conn, memoryview(answer), time.monotonic() + _HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            return False
        return hmac.compare_digest(bytes(answer), _answer(self._secret, challenge))

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self._authenticated(conn):
                self.num_refused += 1
                return
            conn.settimeout(None)
            while True:
                try:
                    req = _recv_header(conn, PullRequest, None, eof_ok=True)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    # The length prefix kept framing intact: answer and keep the connection.
                    _send_header(conn, PullReply(-1, False, error=f"bad pull request: {e}"))
                    continue
                if req is None:
                    return  # the decode instance hung up
                try:
                    ids = check_block_ids(req.block_ids, self.cache.shape[0], "source")
                    if req.region is not None:
                        req.region.check(self.endpoint)
                except ValueError as e:
                    _send_header(conn, PullReply(req.request_id, False, error=str(e)))
                    continue
                chunks = self._rows(ids, req.region)
                _send_header(conn, PullReply(req.request_id, True,
                                             nbytes=sum(c.nbytes for c in chunks)))
                for chunk in chunks:
                    conn.sendall(chunk)
        except OSError:
            pass  # peer reset, or close() shut the socket: either way this connection is done
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            conns = list(self._conns.items())
        self._listener.close()
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv or send
            except OSError:
                pass
        self._acceptor.join(timeout=5)
        for _, thread in conns:
            thread.join(timeout=5)


def allocate_tcp_cache(shape: KVCacheShape, num_blocks: int, dtype: torch.dtype,
                       host: str = "127.0.0.1", port: int = 0,
                       device: torch.device | str = "cpu", *,
                       secret: bytes) -> tuple[torch.Tensor, TcpSource]:
    cache = allocate_kv_cache(shape, num_blocks, dtype, device=device)
    return cache, TcpSource(cache, host, port, secret=secret)


class TcpPuller:
    """One connection per prefill instance, reused across pulls; a broken one is dropped and
    the next pull reconnects. `timeout` bounds a whole pull, connecting included, so a dead or
    hung prefill instance costs an error, never a hang. Not thread-safe: one per thread."""

    def __init__(self, timeout: float = 30.0, *, secret: bytes) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self._secret = secret
        self._conns: dict[tuple[str, int], socket.socket] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._ids = itertools.count()

    def _connect(self, endpoint: KVEndpoint, deadline: float) -> socket.socket:
        key = (endpoint.host, endpoint.port)
        sock = self._conns.get(key)
        if sock is not None:
            return sock
        sock = socket.create_connection(key, timeout=max(deadline - time.monotonic(), 1e-3))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _recv_header(sock, KVEndpoint, deadline)
            challenge = bytearray(_CHALLENGE_BYTES)
            _recv_into(sock, memoryview(challenge), deadline)
            sock.sendall(_answer(self._secret, bytes(challenge)))
        except BaseException:
            sock.close()
            raise
        if hello.layout != endpoint.layout:
            sock.close()
            raise TransferError(f"the KV source at {endpoint.where} exports layout "
                                f"{hello.layout}, its endpoint says {endpoint.layout}: "
                                "stale endpoint?")
        self._conns[key] = sock
        return sock

    def _drop(self, endpoint: KVEndpoint) -> None:
        sock = self._conns.pop((endpoint.host, endpoint.port), None)
        if sock is not None:
            sock.close()

    def _landing(self, dst_cache: torch.Tensor, dst: list[int]) -> list[np.ndarray]:
        """Where the payload's bytes go: on CPU straight into the destination blocks (garbage
        there after a failed pull is fine: they belong to the request until it succeeds);
        for a GPU cache, a pinned staging buffer reused across pulls."""
        if dst_cache.device.type == "cpu":
            table = byte_rows(dst_cache)
            return [table[b] for b in dst]
        nbytes = len(dst) * dst_cache[0].nbytes
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(max(nbytes, 2 * self._staging.numel()),
                                        dtype=torch.uint8, pin_memory=True)
        return [self._staging[:nbytes].numpy()]

    def pull(self, endpoint: KVEndpoint, src_blocks: Sequence[int], dst_cache: torch.Tensor,
             dst_blocks: Sequence[int]) -> TransferStats:
        src, dst = check_pull("tcp", endpoint, src_blocks, dst_cache, dst_blocks)
        start = time.perf_counter()
        if not src:
            return TransferStats(0, 0.0)
        expected = len(src) * endpoint.bytes_per_block
        self._request(endpoint, PullRequest(next(self._ids), src), expected,
                      lambda: self._landing(dst_cache, dst))
        if dst_cache.device.type != "cpu":
            rows = self._staging[:expected].view(endpoint.torch_dtype)
            copy_rows(dst_cache, dst, rows.view(len(src), *endpoint.block_shape),
                      list(range(len(src))))
        return TransferStats(expected, time.perf_counter() - start)

    def fetch(self, endpoint: KVEndpoint, src_blocks: Sequence[int], region: Region
              ) -> tuple[torch.Tensor, TransferStats]:
        start = time.perf_counter()
        region.check(endpoint)
        src = check_block_ids(src_blocks, endpoint.num_blocks, "source")
        rows = torch.empty((len(src), region.layer_stop - region.layer_start, 2,
                            endpoint.block_size, region.head_stop - region.head_start,
                            endpoint.head_dim), dtype=endpoint.torch_dtype)
        if src:
            self._request(endpoint, PullRequest(next(self._ids), src, region), rows.nbytes,
                          lambda: [rows.view(torch.uint8).numpy().reshape(-1)])
        return rows, TransferStats(rows.nbytes, time.perf_counter() - start)

    def _request(self, endpoint: KVEndpoint, req: PullRequest, expected: int,
                 landing: Callable[[], list[np.ndarray]]) -> None:
        """Sends one pull request and receives its `expected` bytes into `landing()`."""
        src = req.block_ids
        deadline = time.monotonic() + self.timeout
        try:
            sock = self._connect(endpoint, deadline)
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            _send_header(sock, req)
            reply = _recv_header(sock, PullReply, deadline)
            if reply.request_id != req.request_id:
                raise ConnectionError(f"reply to request {reply.request_id}, "
                                      f"expected {req.request_id}")
            if reply.ok:
                if reply.nbytes != expected:
                    raise ConnectionError(f"source sends {reply.nbytes} bytes, expected {expected}")
                for chunk in landing():
                    _recv_into(sock, memoryview(chunk), deadline)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            self._drop(endpoint)  # its state mid-message is unknown: never reuse it
            what = "timed out" if isinstance(e, TimeoutError) else f"failed: {e}"
            raise TransferError(f"pull of {len(src)} KV blocks from {endpoint.where} {what} "
                                f"(timeout {self.timeout:g} s)") from e
        except BaseException:  # interrupted mid-message: the stream is out of step
            self._drop(endpoint)
            raise
        if not reply.ok:
            raise TransferError(f"the KV source at {endpoint.where} refused the pull: "
                                f"{reply.error}")

    def close(self) -> None:
        for sock in self._conns.values():
            sock.close()
        self._conns.clear()
