"""How fast each KV transfer backend moves a request's blocks on this machine.

`python -m distserve.transfer.bench` pulls a random set of blocks of a SmolLM2-sized cache
(30 layers, 3 KV heads, head_dim 64, block 16, bf16) and prints GB/s per backend. The source
runs in a child process, as a prefill instance would. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import subprocess
import sys

import msgspec
import torch

from distserve.cluster.messages import SECRET_ENV
from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.transfer.base import KVEndpoint

SMOLLM2 = KVCacheShape(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)


def serve(num_blocks: int) -> None:
    """Child side: one shm cache, also served over tcp, until stdin closes."""
    from distserve.transfer import TcpSource, allocate_shm_cache

    cache, shm = allocate_shm_cache(SMOLLM2, num_blocks, torch.bfloat16)
    cache.copy_(torch.randn(cache.shape))
    tcp = TcpSource(cache, secret=bytes.fromhex(os.environ[SECRET_ENV]))
    print(msgspec.json.encode({"shm": shm.endpoint, "tcp": tcp.endpoint}).decode(), flush=True)
    sys.stdin.read()
    tcp.close()
    shm.close()


def measure(endpoint: KVEndpoint, blocks: int, repeats: int, secret: bytes) -> list[float]:
    from distserve.transfer import make_puller

    puller = make_puller(endpoint.backend, secret=secret)
    dst_cache = allocate_kv_cache(SMOLLM2, blocks * 2, torch.bfloat16)
    rng = random.Random(0)
    gbps = []
    try:
        for i in range(repeats + 1):
            src = rng.sample(range(endpoint.num_blocks), blocks)
            dst = rng.sample(range(blocks * 2), blocks)
            stats = puller.pull(endpoint, src, dst_cache, dst)
            if i > 0:  # the first pull maps the segment or opens the connection
                gbps.append(stats.gbps)
    finally:
        puller.close()
    return gbps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64, help="blocks per pull (default 64)")
    ap.add_argument("--source-blocks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.blocks > args.source_blocks:
        ap.error(f"--blocks {args.blocks} exceeds --source-blocks {args.source_blocks}")
    if args.serve:
        return serve(args.source_blocks)
    secret = secrets.token_bytes(32)
    child = subprocess.Popen([sys.executable, "-m", "distserve.transfer.bench", "--serve",
                              "--source-blocks", str(args.source_blocks)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, SECRET_ENV: secret.hex()})
    try:
        endpoints = msgspec.json.decode(child.stdout.readline(), type=dict[str, KVEndpoint])
        mib = args.blocks * SMOLLM2.bytes_per_block(torch.bfloat16) / 2**20
        print(f"{args.blocks} blocks of a SmolLM2-sized bf16 cache = {mib:.1f} MiB per pull, "
              f"{args.repeats} pulls, source in another process")
        for backend in endpoints:   # the host-memory backends; cuda_ipc needs a GPU
            gbps = measure(endpoints[backend], args.blocks, args.repeats, secret)
            print(f"  {backend:4s} median {statistics.median(gbps):6.2f} GB/s   "
                  f"min {min(gbps):6.2f}   max {max(gbps):6.2f}", flush=True)
    finally:
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()
