"""The executor seam: what runs a scheduled batch for an instance and says what it sampled.

The engine hands each step's prefills and decodes to its executor and gets one sampled token
per finished row back; it never touches the model, the device or the KV tensors itself.
`LocalExecutor` runs one worker (model, KV cache, model runner) in this process on one
device; `ParallelExecutor` (parallel_executor.py) runs TP x PP workers over
torch.distributed behind the same interface, so the engine is the same for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distserve.config import EngineConfig
from distserve.engine.sampler import SampleResult, sample
from distserve.engine.worker import CacheAllocator, Worker, load_worker
from distserve.kv.cache import KVShard, allocate_kv_cache
from distserve.request import Request
from distserve.transfer.base import InstanceEndpoint, KVPuller, TransferStats
from distserve.transfer.reshard import pull_resharded


@dataclass
class ExecuteResult:
    sampled: list[Request]          # requests whose last token was computed this step
    samples: SampleResult | None    # their next tokens, in the same order


class Executor(Protocol):
    model_name: str
    tokenizer: Any
    vocab_size: int
    num_kv_blocks: int
    max_model_len: int              # the model's positions (or the configured limit)
    eos_token_ids: set[int]
    kv_cache: torch.Tensor          # rank 0's KV cache (the whole cache with one worker)
    kv_shards: list[KVShard]        # this process's share of the KV (all of it with one worker)
    on_step: Any                    # on_step(start, end, prefills, decodes): a step trace

    def execute(self, prefills: list[tuple[Request, int]],
                decodes: list[Request]) -> ExecuteResult: ...

    @property
    def can_decode_ahead(self) -> bool:
        """Can `decode_ahead` run (a whole model on our CPU kernels in one worker)."""

    def decode_ahead(self, decodes: list[Request], steps: list[int]) -> list[list[int]]:
        """The next max(steps) greedy tokens of each request of a decode-only batch in one
        call, of which request i's first steps[i] count; each block table holds their slots."""

    def pull_kv(self, puller: KVPuller, source: InstanceEndpoint, src_blocks: list[int],
                dst_blocks: list[int]) -> TransferStats:
        """Fills `dst_blocks` of this instance's KV with `src_blocks` of another's, whatever
        either's TP and PP; raises TransferError when it fails."""

    def close(self) -> None: ...


def load_executor(config: EngineConfig, allocate_cache: CacheAllocator = allocate_kv_cache,
                  pin_cores: bool = False, kv_link=None) -> Executor:
    """One worker here, or TP x PP workers (`allocate_cache` is for the one-worker case;
    `pin_cores` deals this process's cores out to the workers, and `kv_link`, a
    transfer.shares.KVLink, says how each worker moves its own share of the KV)."""
    if config.num_workers > 1:
        from distserve.engine.parallel_executor import ParallelExecutor
        return ParallelExecutor(config, pin_cores, kv_link)
    return LocalExecutor.load(config, allocate_cache)


class LocalExecutor:
    """One worker in this process, on one device."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.model_name = worker.model_name
        self.tokenizer = worker.tokenizer
        self.vocab_size = worker.model.args.vocab_size
        self.num_kv_blocks = worker.num_kv_blocks
        self.max_model_len = worker.max_model_len
        self.eos_token_ids = worker.eos_token_ids
        self.kv_cache = worker.runner.kv_cache
        self.kv_shards = [KVShard(self.kv_cache)]

    @property
    def on_step(self):
        return self.worker.runner.on_step

    @on_step.setter
    def on_step(self, hook) -> None:
        self.worker.runner.on_step = hook

    @classmethod
    def load(cls, config: EngineConfig,
             allocate_cache: CacheAllocator = allocate_kv_cache) -> LocalExecutor:
        """`allocate_cache` lets a KV transfer backend own the cache memory."""
        return cls(load_worker(config, allocate_cache))

    def execute(self, prefills: list[tuple[Request, int]],
                decodes: list[Request]) -> ExecuteResult:
        result = self.worker.runner.run(prefills, decodes)
        if not result.sampled:
            return ExecuteResult([], None)
        return ExecuteResult(result.sampled, sample(result.logits, result.sampled))

    @property
    def can_decode_ahead(self) -> bool:
        return self.worker.runner.can_decode_ahead

    def decode_ahead(self, decodes: list[Request], steps: list[int]) -> list[list[int]]:
        return self.worker.runner.decode_ahead(decodes, steps)

    def pull_kv(self, puller: KVPuller, source: InstanceEndpoint, src_blocks: list[int],
                dst_blocks: list[int]) -> TransferStats:
        return pull_resharded(puller, source, src_blocks, self.kv_shards, dst_blocks)

    def close(self) -> None:
        pass  # the model and cache go with this process's memory
