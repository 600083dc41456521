"""One worker of a tensor- and pipeline-parallel instance: its part of every step.

Every worker (the instance's own process is rank 0, the others are processes of their own)
holds one shard of the model and the matching share of the KV cache (its layers, its KV
heads). Each step, rank 0 broadcasts the step's micro-batches as one int64 tensor (engine/
batch.py); then every worker runs its part: stage 0 embeds, each stage runs its layers and
sends the hidden states on to the next stage without waiting (so stage 0 computes micro-batch
2 while stage 1 computes micro-batch 1), the workers of a stage sum their row-parallel
matmuls with an all-reduce, and the last stage gathers the vocabulary ranges of the logits
and sends them to rank 0, which samples. Control tensors (headers, steps, pull orders) travel
over gloo, CUDA tensors over NCCL; nothing is pickled. A KV transfer is every worker's own:
each exports its share (prefill) or pulls into it (decode), told what by rank 0
(transfer/shares.py), so the same code runs where the shares are shared memory and where each
lives on its worker's GPU.

Run as `python -m distserve.engine.parallel --rank R ...` by the parallel executor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import msgspec
import torch
import torch.distributed as dist

from distserve.config import EngineConfig
from distserve.engine.batch import Batch, decode, prepare
from distserve.kv.cache import KVCacheShape, KVShard, allocate_kv_cache
from distserve.models.loader import ModelSource, build_model, resolve_dtype
from distserve.models.sharding import Shard, make_shard, split_ranges
from distserve.models.registry import model_class
from distserve.transfer import make_puller
from distserve.transfer.base import check_backend_device
from distserve.transfer.shares import (KVLink, decode_order, export_share,
                                       pull_own_share)

log = logging.getLogger(__name__)

STOP, STEP, PULL = 0, 1, 2   # what rank 0's header broadcast asks of every worker
INIT_TIMEOUT_S = 300     # every worker loads its shard of the weights before the first step


@dataclass
class ParallelLayout:
    """Who is who in an instance of TP x PP workers."""
    tp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.tp, (stage + 1) * self.tp))


def model_dims(source: ModelSource):
    return model_class(source.hf_config.get("model_type", "<missing>")).dims(source.hf_config)


def shard_cache_shape(source: ModelSource, shard: Shard, block_size: int) -> KVCacheShape:
    """The KV cache a worker holds: its layers, its KV heads."""
    c = source.hf_config
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return KVCacheShape(shard.layers[1] - shard.layers[0], shard.kv_heads[1] - shard.kv_heads[0],
                        head_dim, block_size)


def group_backend(device: torch.device) -> str:
    """gloo for CPU tensors always (the control broadcasts are CPU tensors), NCCL for CUDA's."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def join_group(layout: ParallelLayout, rank: int, store: dist.Store,
               device: torch.device) -> list:
    """Joins the instance's process group; returns every stage's TP group (all ranks create
    them all, in the same order, as torch.distributed requires)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(group_backend(device), store=store, rank=rank,
                            world_size=layout.world_size,
                            timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    return [dist.new_group(layout.stage_ranks(s)) for s in range(layout.pp)]


class StageWorker:
    """This rank's shard of the model and of the KV cache, and its part of a step."""

    def __init__(self, source: ModelSource, shard: Shard, kv_cache: torch.Tensor,
                 config: EngineConfig, dtype: torch.dtype, device: torch.device,
                 tp_groups: list) -> None:
        self.shard, self.kv_cache, self.device = shard, kv_cache, device
        self.kv_share = KVShard(kv_cache, shard.layers[0], shard.kv_heads[0])
        self.block_size = config.block_size
        self.model = build_model(source, dtype, device, shard)
        self.dtype = dtype
        self.hidden_size = source.hf_config.get("hidden_size")
        self.tp_group = tp_groups[shard.stage]
        self.stage_leader = shard.stage * shard.tp           # gathers the logits
        self.last_leader = (shard.pp - 1) * shard.tp         # the last stage's leader
        self.vocab = model_dims(source).vocab
        self.vocab_width = -(-self.vocab // shard.tp)        # every range, padded to the widest
        if shard.tp > 1:
            group = self.tp_group

            def reduce(x: torch.Tensor) -> torch.Tensor:
                dist.all_reduce(x, group=group)
                return x
            for module in self.model.modules():
                if hasattr(module, "tp_reduce"):
                    module.tp_reduce = reduce

    @torch.inference_mode()
    def run(self, batches: list[Batch]) -> list[torch.Tensor]:
        """Runs this rank's part of each micro-batch; on rank 0, returns the logits of each
        micro-batch that samples ([rows, vocab]), in order."""
        s = self.shard
        rank = s.rank
        pending, out = [], []
        for batch in batches:
            x = prepare(batch, self.block_size, self.device)
            if s.is_first_stage:
                state = self.model.embed(x.input_ids, x.positions)
            else:
                state = self._receive_state(batch.num_tokens, rank - s.tp)
            state = self.model.run_layers(state, x.positions, self.kv_cache, x.meta)
            if not s.is_last_stage:
                pending += [dist.isend(t.contiguous(), rank + s.tp) for t in state]
                pending.append(state)  # alive until sent
            elif batch.num_sampled:
                logits = self._gather_logits(self.model.finish(state)[x.logit_rows])
                if logits is not None:
                    if rank == 0:
                        out.append(logits)
                    else:
                        pending += [dist.isend(logits, 0), logits]
        if rank == 0 and not s.is_last_stage:
            for batch in batches:
                if batch.num_sampled:
                    logits = torch.empty(batch.num_sampled, self.vocab, dtype=self.dtype,
                                         device=self.device)
                    dist.recv(logits, self.last_leader)
                    out.append(logits)
        for p in pending:
            if hasattr(p, "wait"):
                p.wait()
        return out

    def _receive_state(self, num_tokens: int, src: int) -> tuple:
        state = []
        for _ in range(self.model.STAGE_TENSORS):
            t = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(t, src)
            state.append(t)
        return tuple(state)

    def _gather_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The whole vocabulary's logits on the stage leader (None elsewhere)."""
        part = self.model.compute_logits(hidden)
        if self.shard.tp == 1:
            return part.contiguous()
        padded = torch.nn.functional.pad(part, (0, self.vocab_width - part.shape[1])).contiguous()
        leader = self.shard.rank == self.stage_leader
        parts = [torch.empty_like(padded) for _ in range(self.shard.tp)] if leader else None
        dist.gather(padded, parts, dst=self.stage_leader, group=self.tp_group)
        if not leader:
            return None
        ranges = split_ranges(self.vocab, self.shard.tp)
        return torch.cat([p[:, :hi - lo] for p, (lo, hi) in zip(parts, ranges)], dim=1)


# ---------------------------------------------------------------- a worker process
def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one worker of a parallel distserve instance")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--store", required=True, help="host:port of the instance's TCPStore")
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--kv-segment", default="", help="shm segment of this worker's KV (CPU)")
    ap.add_argument("--num-blocks", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s worker {args.rank} %(levelname)s: %(message)s")
    from distserve.engine.worker import prepare_device
    from distserve.models.loader import find_model
    from distserve.transfer.shm import attach_shm_cache

    config = EngineConfig(**json.loads(args.config_json))
    _exit_with_parent()
    device = torch.device(args.device)
    prepare_device(config, device)
    layout = ParallelLayout(args.tp, args.pp)
    host, port = args.store.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), layout.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    link = KVLink.from_env()
    if link is not None:
        check_backend_device(link.backend, device)
    groups = join_group(layout, args.rank, store, device)
    source = find_model(config.model)
    shard = make_shard(model_dims(source), args.tp, args.pp, args.rank)
    dtype = resolve_dtype(config.dtype, device)
    shape = shard_cache_shape(source, shard, config.block_size)
    if args.kv_segment:
        cache = attach_shm_cache(args.kv_segment, shape, args.num_blocks, dtype)
    else:
        cache = allocate_kv_cache(shape, args.num_blocks, dtype, device)
    worker = StageWorker(source, shard, cache, config, dtype, device, groups)
    exported = None
    if link is not None and link.export:
        exported, endpoint = export_share(link, worker.kv_share, args.kv_segment)
        store.set(endpoint_key(args.rank), msgspec.msgpack.encode(endpoint))
    dist.barrier()   # loaded (and exported): rank 0 may send the first step
    try:
        serve_steps(worker, link)
    except (RuntimeError, ConnectionError) as e:  # rank 0 is gone: nothing left to do
        log.warning("stopping: %s", e)
        os._exit(1)
    if exported is not None:
        exported.close()
    dist.destroy_process_group()
    return 0


def endpoint_key(rank: int) -> str:
    """Where a prefill worker publishes its share's KV endpoint in the instance's store."""
    return f"kv-endpoint/{rank}"


def serve_steps(worker: StageWorker, link: KVLink | None) -> None:
    header = torch.empty(2, dtype=torch.long)
    puller = None
    try:
        while True:
            dist.broadcast(header, 0)
            op, size = int(header[0]), int(header[1])
            if op == STOP:
                return
            if op == PULL:
                payload = torch.empty(size, dtype=torch.uint8)
                dist.broadcast(payload, 0)
                if puller is None:
                    puller = make_puller(link.backend, secret=link.secret)
                nbytes, error = pull_own_share(puller, decode_order(payload), worker.kv_share)
                dist.all_reduce(torch.tensor([int(bool(error)), nbytes], dtype=torch.long))
                continue
            payload = torch.empty(size, dtype=torch.long)
            dist.broadcast(payload, 0)
            worker.run(decode(payload))
    finally:
        if puller is not None:
            puller.close()


def _exit_with_parent() -> None:
    """A worker whose instance process died exits too (it may be blocked in a collective)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    sys.exit(worker_main())
