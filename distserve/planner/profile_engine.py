"""Times our own engine's model runner on this device: prefill batches and decode steps.

The only planner module that imports torch; `distserve profile` imports it lazily. Requests
are random token ids with KV blocks from the engine's own allocator; a decode step reads
whatever the cache holds, which costs the same as real context.
"""
from __future__ import annotations

import os
import random
import statistics
import time

import torch

from distserve.config import EngineConfig
from distserve.engine.executor import LocalExecutor
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
            prefill_shapes: list[list[int]], decode_shapes: list, repeats: int,
            progress=lambda msg: None, overhead_batches: list[int] = (), clock: str = "wall",
            tp: int = 1, pp: int = 1) -> dict:
    """{"prefill": [(lens, ms)], "decode": [(context lens, ms)], "model", "device", "hardware",
    "overhead": [(batch, ms)]}. A decode shape is (batch, context) or a list of contexts (a
    mixed batch). `overhead_batches`: batch sizes at which to time what a real engine step
    adds to the model runner (scheduling, sampling, detokenisation, stop checks).
    clock "cpu": this process's CPU time instead of wall time, for a one-thread CPU engine on a
    machine that other jobs share (their time slices on its core are not counted).
    tp, pp: time an instance of TP x PP workers (num_threads each, on this process's cores):
    a whole step of its executor, which also samples (greedy: an argmax per request)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    decode_shapes = [list(s) if isinstance(s, list) else [s[1]] * s[0] for s in decode_shapes]
    if tp * pp > 1:
        if clock != "wall" or overhead_batches:
            raise ValueError("a parallel instance is timed by the wall clock, without the "
                             "engine-overhead round")
        return _measure_parallel(model, dtype, device, num_threads, prefill_shapes,
                                 decode_shapes, repeats, progress, tp, pp)
    now = time.perf_counter if clock == "wall" else time.process_time
    config = _config_for(model, dtype, device, num_threads, prefill_shapes, decode_shapes,
                         overhead_batches)
    block = config.block_size
    worker = load_worker(config)
    dev, runner = worker.device, worker.runner
    vocab = worker.model.args.vocab_size
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out = {"model": worker.model_name, "device": str(dev), "hardware": _hardware_tag(dev)}
    out |= _time_shapes(lambda prefills, decodes: runner.run(prefills, decodes),
                        KVCacheManager(worker.num_kv_blocks, block), vocab, gen, sync, now,
                        prefill_shapes, decode_shapes, repeats, progress)
    out["overhead"] = []
    if overhead_batches:
        out["overhead"] = step_overhead(config, worker, overhead_batches, vocab, gen, sync, progress,
                                        now=now)
    out["transfer"] = measure_kv_pull(worker.runner.kv_cache, repeats)
    return out


def measure_kv_pull(cache: torch.Tensor, repeats: int = 3, blocks: int = 32) -> dict:
    """How fast a decode instance pulls KV from a prefill instance here, through the real
    backend (shared memory on CPU, TCP on a GPU): {"backend", "bytes_per_s"}, the best of a
    few pulls of `blocks` blocks of this cache's layout (the planner's KV link on one host)."""
    import secrets

    from distserve.kv.cache import KVCacheShape
    from distserve.transfer import make_puller, make_source
    n, layers, _, block_size, heads, head_dim = cache.shape
    blocks = max(1, min(blocks, n))
    backend = "shm" if cache.device.type == "cpu" else "tcp"
    secret = secrets.token_bytes(32)
    shape = KVCacheShape(layers, heads, head_dim, block_size)
    src, source = make_source(backend, shape, blocks, cache.dtype, cache.device, secret=secret)
    puller = make_puller(backend, secret=secret)
    dst = torch.empty_like(src)
    try:
        src.normal_()
        ids = list(range(blocks))
        best = float("inf")
        for _ in range(max(repeats, 3)):
            stats = puller.pull(source.endpoint, ids, dst, ids)
            best = min(best, stats.seconds)
        return {"backend": backend, "bytes_per_s": stats.nbytes / best if best > 0 else 0.0,
                "bytes": stats.nbytes}
    finally:
        puller.close()
        source.close()


def _config_for(model, dtype, device, num_threads, prefill_shapes, decode_shapes,
                overhead_batches=(), **parallel) -> EngineConfig:
    """An engine config with room for the largest shape's KV."""
    need = max([sum(s) for s in prefill_shapes] + [sum(c + 2 for c in s) for s in decode_shapes]
               + [b * (_OVERHEAD_CONTEXT + 2 * _OVERHEAD_STEPS) for b in overhead_batches])
    block = 16
    extra = 2 * max([len(s) for s in prefill_shapes] + [len(s) for s in decode_shapes]) + 8
    return EngineConfig(model=model, dtype=dtype, device=device, num_threads=num_threads,
                        block_size=block, num_kv_blocks=blocks_for(need, block) + extra,
                        **parallel)


def _measure_parallel(model, dtype, device, num_threads, prefill_shapes, decode_shapes,
                      repeats, progress, tp, pp) -> dict:
    from distserve.engine.parallel_executor import ParallelExecutor
    config = _config_for(model, dtype, device, num_threads, prefill_shapes, decode_shapes,
                         tensor_parallel_size=tp, pipeline_parallel_size=pp)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    executor = ParallelExecutor(config, pin_cores=True)   # deals this process's cores out
    try:
        dev = executor.kv_cache.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        out = {"model": executor.model_name, "device": str(dev), "hardware": _hardware_tag(dev),
               "tp": tp, "pp": pp, "overhead": []}
        out |= _time_shapes(executor.execute, KVCacheManager(executor.num_kv_blocks, 16),
                            executor.vocab_size, torch.Generator().manual_seed(0), sync,
                            time.perf_counter, prefill_shapes, decode_shapes, repeats, progress)
        return out
    finally:
        executor.close()
        if cores:
            os.sched_setaffinity(0, cores)


def _time_shapes(step, kv: KVCacheManager, vocab: int, gen, sync, now, prefill_shapes,
                 decode_shapes, repeats: int, progress) -> dict:
    """{"prefill": [(lens, ms)], "decode": [(contexts, ms)]} of step(prefills, decodes)."""
    params = SamplingParams(max_tokens=1)

    def make(n: int, out_token: bool) -> Request:
        req = Request(f"p{n}", torch.randint(0, vocab, (n,), generator=gen).tolist(), params, 0.0)
        if out_token:
            req.append_token(1, None, 0.0)
            req.num_computed_tokens = n
        kv.allocate(req, req.num_tokens)
        return req

    def timed_round_robin(kind: str, shapes: list[list[int]], out_token: bool, batch) -> list[float]:
        """Median ms per shape over `repeats` rounds through all the shapes (after a warm-up
        round), each round in a new order: a slow spell of the machine (they last seconds
        here) then lands on a few samples of many shapes, not on every sample of one."""
        times: list[list[float]] = [[] for _ in shapes]
        order = list(range(len(shapes)))
        for round_ in range(repeats + 1):
            for i in order:
                reqs = [make(n, out_token) for n in shapes[i]]
                sync()
                t = now()
                batch(reqs)
                sync()
                if round_:
                    times[i].append((now() - t) * 1e3)
                for r in reqs:
                    kv.free(r)
            progress(f"{kind}: round {round_} of {repeats} done" if round_ else f"{kind}: warmed up")
            random.Random(round_).shuffle(order)
        return [statistics.median(t) for t in times]

    out = {"prefill": [], "decode": []}
    prefill_ms = timed_round_robin("prefill", prefill_shapes, False,
                                   lambda reqs: step([(r, r.num_tokens) for r in reqs], []))
    for lens, ms in zip(prefill_shapes, prefill_ms):
        out["prefill"].append((lens, ms))
        progress(f"prefill {len(lens)} x {lens[0]} tokens: {ms:.2f} ms")
    decode_ms = timed_round_robin("decode", decode_shapes, True, lambda reqs: step([], reqs))
    for ctxs, ms in zip(decode_shapes, decode_ms):
        out["decode"].append((list(ctxs), ms))
        what = (f"{len(ctxs)} x context {ctxs[0]}" if min(ctxs) == max(ctxs)
                else f"{len(ctxs)}, contexts {min(ctxs)}..{max(ctxs)} (sum {sum(ctxs)})")
        progress(f"decode batch {what}: {ms:.2f} ms")
    return out


_OVERHEAD_CONTEXT, _OVERHEAD_STEPS = 64, 12


def step_overhead(config: EngineConfig, worker, batches: list[int], vocab: int, gen, sync,
                  progress=lambda msg: None, context: int = _OVERHEAD_CONTEXT,
                  steps: int = _OVERHEAD_STEPS, now=time.perf_counter) -> list:
    """[(batch, ms)]: median time of a colocated engine's decode step beyond its model-runner
    call, with `batch` greedy requests that ignore EOS (the bench's load)."""
    from distserve.engine.engine import Engine
    engine = Engine(config, LocalExecutor(worker))
    runner = worker.runner
    inner: list = []

    def run(prefills, decodes):
        sync()
        t = now()
        res = type(runner).run(runner, prefills, decodes)
        sync()
        inner.append(now() - t)
        return res

    runner.run = run   # an instance attribute: the class's method is untouched
    out = []
    try:
        for b in batches:
            params = SamplingParams(temperature=0.0, max_tokens=steps + 3, ignore_eos=True)
            for _ in range(b):
                engine.add(torch.randint(0, vocab, (context,), generator=gen).tolist(), params)
            while engine.stats().num_waiting:
                engine.step()   # the prefills
            extra = []
            for _ in range(steps):
                inner.clear()
                t = now()
                engine.step()
                extra.append((now() - t - sum(inner)) * 1e3)
            for rid in list(engine.requests):
                engine.abort(rid)
            ms = statistics.median(extra)
            out.append((b, ms))
            progress(f"engine step overhead, batch {b}: {ms:.3f} ms")
    finally:
        del runner.run
    return out
