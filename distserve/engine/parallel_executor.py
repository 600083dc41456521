"""The executor of a tensor- and pipeline-parallel instance: TP x PP workers, one of them here.

Rank 0 runs in the instance's process, next to the scheduler; the other workers are
processes of their own (`python -m distserve.engine.parallel`), pinned to their share of the
instance's CPU cores, or one CUDA device each. Each worker moves its own share of the KV
cache (`kv_link`): on a prefill instance every worker exports its share (its shared-memory
segment, which this process allocates so that it is unlinked whatever happens to the worker,
or a tcp server of its own) and `kv_endpoints` lists them in rank order; on a decode instance
`pull_kv` tells every worker what to pull into its share and fails the pull if any worker's
part fails. A worker that dies takes the instance with it: the controller's supervisor
restarts the whole instance, as it does for one that crashes.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Callable

import msgspec
import torch
import torch.distributed as dist

from distserve.config import EngineConfig
from distserve.engine.batch import Batch, encode, split_micro_batches, warm_up_batches
from distserve.engine.executor import ExecuteResult
from distserve.engine.parallel import (INIT_TIMEOUT_S, PULL, STEP, STOP, ParallelLayout,
                                       StageWorker, endpoint_key, join_group, model_dims,
                                       shard_cache_shape)
from distserve.engine.sampler import sample
from distserve.engine.worker import _eos_ids, prepare_device
from distserve.kv.cache import allocate_kv_cache
from distserve.models.loader import default_device, find_model, load_tokenizer_for, resolve_dtype
from distserve.models.sharding import check_parallelism, make_shard
from distserve.request import Request
from distserve.transfer.base import InstanceEndpoint, KVEndpoint, KVPuller, TransferStats
from distserve.transfer.base import check_backend_device
from distserve.transfer.shares import (LINK_ENV, KVLink, PullOrder,
                                       encode_order, export_share, pull_own_share, pull_result)

log = logging.getLogger(__name__)
_STOP_TIMEOUT_S = 10.0


def core_shares(cores: list[int], workers: int) -> list[list[int]]:
    """The instance's CPU cores dealt out to its workers: contiguous shares when there are
    enough, else round robin (workers then share cores)."""
    if not cores:
        return [[] for _ in range(workers)]
    if len(cores) >= workers:
        q, r = divmod(len(cores), workers)
        shares, start = [], 0
        for i in range(workers):
            size = q + (i < r)
            shares.append(cores[start:start + size])
            start += size
        return shares
    return [[cores[i % len(cores)]] for i in range(workers)]


class ParallelExecutor:
    def __init__(self, config: EngineConfig, pin_cores: bool = False,
                 kv_link: KVLink | None = None) -> None:
        """pin_cores: deal this process's CPU cores out to the workers, this process keeping
        the first share (an instance process, pinned by its launcher, does; a library caller
        keeps its own affinity). kv_link: how this instance's KV moves, if it does."""
        from distserve.transfer.shm import allocate_shm_cache
        self.config = config
        self.kv_link = kv_link
        self._closed = False
        self.layout = ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size)
        world = self.layout.world_size
        device = torch.device(config.device) if config.device else default_device()
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # rank r uses visible device r
        if kv_link is not None:
            check_backend_device(kv_link.backend, device)
        source = find_model(config.model)
        dims = model_dims(source)
        check_parallelism(dims, self.layout.tp, self.layout.pp)
        dtype = resolve_dtype(config.dtype, device)
        shards = [make_shard(dims, self.layout.tp, self.layout.pp, r) for r in range(world)]
        whole = shard_cache_shape(source, make_shard(dims, 1, 1, 0), config.block_size)
        self.num_kv_blocks = config.num_kv_blocks or whole.num_blocks_for(
            int(config.kv_cache_memory_gib * 2**30), dtype)
        self._segments = []   # the workers' shared-memory caches (CPU), unlinked on close
        segments = [""] * world
        cache = None
        for r, shard in enumerate(shards):
            shape = shard_cache_shape(source, shard, config.block_size)
            if device.type == "cpu":
                segment_cache, owner = allocate_shm_cache(shape, self.num_kv_blocks, dtype)
                segments[r] = owner.endpoint.shm_name
                self._segments.append(owner)
                if r == 0:
                    cache = segment_cache
            elif r == 0:   # the others are on their own GPUs, in their own processes
                cache = allocate_kv_cache(shape, self.num_kv_blocks, dtype, device)
        shares = core_shares(_own_cores() if pin_cores else [], world)
        threads = config.num_threads or None
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
        self.procs = [self._spawn(r, store.port, segments[r], shares[r], threads, device)
                      for r in range(1, world)]
        self._store = store
        if shares[0] and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, shares[0])
        prepare_device(EngineConfig(**{**asdict(config),
                                       "num_threads": threads or max(len(shares[0]), 1)}), device)
        groups = join_group(self.layout, 0, store, device)
        self.stage = StageWorker(source, shards[0], cache, config, dtype, device, groups)
        self.kv_shards = [self.stage.kv_share]   # rank 0's; each worker moves its own
        self._kv_export = None
        if kv_link is not None and kv_link.export:
            self._kv_export, own = export_share(kv_link, self.stage.kv_share, segments[0])
        dist.barrier()
        self.kv_endpoints: list[KVEndpoint] = []
        if kv_link is not None and kv_link.export:
            self.kv_endpoints = [own] + [
                msgspec.msgpack.decode(store.get(endpoint_key(r)), type=KVEndpoint)
                for r in range(1, world)]
        self._watch = threading.Thread(target=self._watch_workers, daemon=True, name="workers")
        self._watch.start()
        self.model_name = source.name
        self.tokenizer = load_tokenizer_for(source)
        self.vocab_size = dims.vocab
        self.max_model_len = config.max_model_len or self.stage.model.max_positions
        if self.max_model_len > self.stage.model.max_positions:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"{self.stage.model.max_positions} positions")
        self.eos_token_ids = _eos_ids(source.hf_config, self.tokenizer)
        self.kv_cache = cache
        self.on_step: Callable | None = None
        n = min(config.max_num_batched_tokens, self.max_model_len - 1,
                self.num_kv_blocks * config.block_size - 1)
        if n >= 1:
            for batch in warm_up_batches(n, config.block_size):
                self._run([batch])
        log.info("%s: TP %d x PP %d, %d KV blocks", source.name, self.layout.tp, self.layout.pp,
                 self.num_kv_blocks)

    def _spawn(self, rank: int, port: int, segment: str, cores: list[int], threads: int | None,
               device: torch.device) -> subprocess.Popen:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(threads or max(len(cores), 1))
        if self.kv_link is not None:
            env[LINK_ENV] = self.kv_link.to_env()
        config = asdict(self.config) | {"num_threads": threads or max(len(cores), 1)}
        cmd = [sys.executable, "-m", "distserve.engine.parallel", "--rank", str(rank),
               "--tp", str(self.layout.tp), "--pp", str(self.layout.pp),
               "--store", f"127.0.0.1:{port}", "--config-json", json.dumps(config),
               "--kv-segment", segment, "--num-blocks", str(self.num_kv_blocks),
               "--device", str(torch.device(device.type, rank) if device.type == "cuda" else "cpu")]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        if cores and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(proc.pid, cores)
            except OSError:
                pass
        return proc

    def _watch_workers(self) -> None:
        """A dead worker leaves this instance unable to run a step: end it, so that it is
        restarted whole (a step blocked on the dead worker would otherwise wait for gloo)."""
        while not self._closed:
            for r, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None and not self._closed:
                    log.error("worker %d exited with %s: the instance stops", r, proc.returncode)
                    os._exit(1)
            time.sleep(0.2)

    def _run(self, batches: list[Batch]) -> list[torch.Tensor]:
        payload = encode(batches)
        dist.broadcast(torch.tensor([STEP, payload.numel()], dtype=torch.long), 0)
        dist.broadcast(payload, 0)
        return self.stage.run(batches)

    def execute(self, prefills: list[tuple[Request, int]],
                decodes: list[Request]) -> ExecuteResult:
        start = time.monotonic()
        batch = Batch.of(prefills, decodes)
        owner = {id(row): req for row, req in zip(batch.prefills, (r for r, _ in prefills))}
        owner |= {id(row): req for row, req in zip(batch.decodes, decodes)}
        batches = split_micro_batches(batch, self.layout.pp)
        logits = self._run(batches)
        sampled = [owner[id(row)] for b in batches
                   for row in [*(p for p in b.prefills if p.sampled), *b.decodes]]
        if self.on_step is not None:
            self.on_step(start, time.monotonic(), prefills, decodes)
        if not sampled:
            return ExecuteResult([], None)
        return ExecuteResult(sampled, sample(torch.cat(logits), sampled))

    can_decode_ahead = False   # the workers run one step per broadcast

    def decode_ahead(self, decodes: list[Request], steps: list[int]) -> list[list[int]]:
        raise NotImplementedError("a tensor- or pipeline-parallel instance decodes one step a call")

    def pull_kv(self, puller: KVPuller, source: InstanceEndpoint, src_blocks: list[int],
                dst_blocks: list[int]) -> TransferStats:
        """Every worker pulls its layers and KV heads of `src_blocks` from `source`'s shares
        into `dst_blocks` of its own; a fault on any worker fails the pull (TransferError),
        never the instance. `puller` is rank 0's; the others keep their own."""
        if self.kv_link is None or self.kv_link.export:
            raise ValueError("this instance was not started to pull KV (kv_link)")
        start = time.monotonic()
        order = PullOrder(source, list(src_blocks), list(dst_blocks))
        payload = encode_order(order)
        dist.broadcast(torch.tensor([PULL, payload.numel()], dtype=torch.long), 0)
        dist.broadcast(payload, 0)
        nbytes, error = pull_own_share(puller, order, self.stage.kv_share)
        outcome = torch.tensor([int(bool(error)), nbytes], dtype=torch.long)
        dist.all_reduce(outcome)
        return pull_result(int(outcome[0]), self.layout.world_size, int(outcome[1]),
                           time.monotonic() - start, error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            dist.broadcast(torch.tensor([STOP, 0], dtype=torch.long), 0)
        except RuntimeError:
            pass  # a worker is gone already
        for proc in self.procs:
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        dist.destroy_process_group()
        if self._kv_export is not None:
            self._kv_export.close()
        for segment in self._segments:
            segment.close()


def _own_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
