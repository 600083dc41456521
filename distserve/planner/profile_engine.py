"""Times our own engine's model runner on this device: prefill batches and decode steps.

The only planner module that imports torch; `distserve profile` imports it lazily. Requests
are random token ids with KV blocks from the engine's own allocator; a decode step reads
whatever the cache holds, which costs the same as real context.
"""
from __future__ import annotations

import statistics
import time

import torch

from distserve.config import EngineConfig
from distserve.engine.worker import load_worker
from distserve.kv.cache_manager import KVCacheManager, blocks_for
from distserve.request import Request, SamplingParams


def _hardware_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key, tag in (("h200", "h200"), ("h100", "h100-80g"), ("a100", "a100-80g"), ("l40s", "l40s")):
        if key in name:
            return tag
    return name.replace(" ", "-")


def measure(model: str | None, dtype: str, device: str | None, num_threads: int | None,
            prefill_shapes: list[list[int]], decode_shapes: list[tuple[int, int]], repeats: int,
            progress=lambda msg: None) -> dict:
    """{"prefill": [(lens, ms)], "decode": [(context lens, ms)], "model", "device", "hardware"}."""
    need = max([sum(s) for s in prefill_shapes] + [b * (c + 2) for b, c in decode_shapes])
    block = 16
    config = EngineConfig(model=model, dtype=dtype, device=device, num_threads=num_threads,
                          block_size=block, num_kv_blocks=blocks_for(need, block) + 2 * max(
                              [len(s) for s in prefill_shapes] + [b for b, _ in decode_shapes]) + 8)
    worker = load_worker(config)
    dev, runner = worker.device, worker.runner
    vocab = worker.model.args.vocab_size
    kv = KVCacheManager(worker.num_kv_blocks, block)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1)

    def make(n: int, out_token: bool) -> Request:
        req = Request(f"p{n}", torch.randint(0, vocab, (n,), generator=gen).tolist(), params, 0.0)
        if out_token:
            req.append_token(1, None, 0.0)
            req.num_computed_tokens = n
        kv.allocate(req, req.num_tokens)
        return req

    def timed(fn) -> float:
        fn()   # warm-up
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    out = {"prefill": [], "decode": [], "model": worker.model_name, "device": str(dev),
           "hardware": _hardware_tag(dev)}
    for i, lens in enumerate(prefill_shapes):
        reqs = [make(n, False) for n in lens]
        ms = timed(lambda: runner.run([(r, r.num_tokens) for r in reqs], []))
        out["prefill"].append((lens, ms))
        for r in reqs:
            kv.free(r)
        progress(f"prefill {i + 1}/{len(prefill_shapes)}: {len(lens)} x {lens[0]} tokens: {ms:.2f} ms")
    for i, (batch, ctx) in enumerate(decode_shapes):
        reqs = [make(ctx, True) for _ in range(batch)]
        ms = timed(lambda: runner.run([], reqs))
        out["decode"].append(([ctx] * batch, ms))
        for r in reqs:
            kv.free(r)
        progress(f"decode {i + 1}/{len(decode_shapes)}: batch {batch} x context {ctx}: {ms:.2f} ms")
    return out
