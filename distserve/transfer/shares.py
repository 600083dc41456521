"""A parallel instance's KV transfers, done by every worker for its own share.

Each worker of a TP x PP instance holds its layers x its KV heads of every block. On a
prefill instance each worker exports its share itself (its shared-memory segment, a tcp
server of its own, or its GPU memory as a CUDA IPC handle); on a decode instance each worker
pulls the regions it owns into its own share, told what to pull by rank 0 (`PullOrder`,
msgpack in a uint8 broadcast). The same code runs where the shares are shared memory (CPU)
and where each one lives on its worker's GPU, which only its own worker allocates and frees.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import msgspec
import torch

from distserve.kv.cache import KVShard
from distserve.transfer.base import (InstanceEndpoint, KVEndpoint, KVPuller, TransferError,
                                     TransferStats, check_backend)
from distserve.transfer.reshard import pull_resharded

LINK_ENV = "DISTSERVE_KV_LINK"   # how a parallel executor hands its workers the link


@dataclass(frozen=True)
class KVLink:
    """How an instance's KV moves: the backend, where a tcp source listens, the deployment's
    secret, and whether this instance exports its KV (a prefill instance) or pulls (decode)."""
    backend: str
    secret: bytes
    host: str = "127.0.0.1"
    export: bool = False

    def __post_init__(self) -> None:
        check_backend(self.backend)

    def to_env(self) -> str:
        return json.dumps({"backend": self.backend, "secret": self.secret.hex(),
                           "host": self.host, "export": self.export})

    @classmethod
    def from_env(cls) -> KVLink | None:
        """The link set by the executor (and taken out of the environment), or None."""
        raw = os.environ.pop(LINK_ENV, "")
        if not raw:
            return None
        d = json.loads(raw)
        return cls(d["backend"], bytes.fromhex(d["secret"]), d["host"], d["export"])


def export_share(link: KVLink, share: KVShard, shm_name: str = ""):
    """(closable or None, endpoint) for one worker's share: its shared-memory segment (owned
    by whoever allocated it), its CUDA memory (owned by the worker's engine) or a tcp server
    of its own."""
    from distserve.transfer.cuda_ipc import export_cuda_cache
    from distserve.transfer.tcp import TcpSource
    where = {"layer_start": share.layer_start, "head_start": share.head_start}
    if link.backend == "shm":
        if not shm_name:
            raise ValueError("an shm export needs the share's segment")
        return None, KVEndpoint.for_cache("shm", share.cache, shm_name=shm_name, **where)
    if link.backend == "cuda_ipc":
        return None, export_cuda_cache(share.cache, **where)
    source = TcpSource(share.cache, link.host, 0, secret=link.secret)
    return source, msgspec.structs.replace(source.endpoint, **where)


class PullOrder(msgspec.Struct, frozen=True):
    """What rank 0 tells every worker of a decode instance to pull: from which prefill
    instance's shares, which blocks, into which of its own."""
    source: InstanceEndpoint
    src_blocks: list[int]
    dst_blocks: list[int]


_encoder = msgspec.msgpack.Encoder()


def encode_order(order: PullOrder) -> torch.Tensor:
    return torch.frombuffer(bytearray(_encoder.encode(order)), dtype=torch.uint8)


def decode_order(payload: torch.Tensor) -> PullOrder:
    return msgspec.msgpack.decode(payload.numpy().tobytes(), type=PullOrder)


def pull_own_share(puller: KVPuller, order: PullOrder, share: KVShard) -> tuple[int, str]:
    """(bytes moved, error or ""): this worker's regions of the order, never raising a
    transfer fault (rank 0 decides what a failure on any worker means)."""
    try:
        stats = pull_resharded(puller, order.source, order.src_blocks, [share], order.dst_blocks)
    except (TransferError, ValueError) as e:
        return 0, str(e) or type(e).__name__
    return stats.nbytes, ""


def pull_result(failed: int, workers: int, nbytes: int, seconds: float,
                error: str) -> TransferStats:
    """The instance's pull from its workers' outcomes (how many failed, bytes moved by all):
    a failure on any worker fails the pull."""
    if failed:
        raise TransferError(error or f"{failed} of {workers} workers failed to pull their "
                            "KV share")
    return TransferStats(nbytes, seconds)
