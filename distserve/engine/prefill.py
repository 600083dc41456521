"""The prefill instance: runs prompts, streams each first token, then holds the KV blocks
until a decode instance has pulled them.

FCFS queue; a batch takes prompts in order while their tokens fit the budget (the paper's
L_m; a longer prompt runs alone). The instance stops admitting prompts only when its own KV
memory is full: held blocks are the buffer that absorbs bursts when decoding falls behind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from distserve.config import EngineConfig
from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.engine.outputs import RequestOutput
from distserve.engine.postprocess import StopChecker, apply_samples
from distserve.engine.sampler import sample
from distserve.engine.scheduler import Scheduler, SchedulerOutput
from distserve.engine.worker import Worker
from distserve.kv.cache_manager import KVCacheManager
from distserve.request import FinishReason, Request, RequestStatus, SamplingParams


@dataclass
class MigrationTicket:
    """What a decode instance needs to take a request over after its first token."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    first_text: str
    first_logprob: float | None
    block_ids: list[int]
    arrival_time: float
    first_token_time: float


class PrefillEngine:
    def __init__(self, config: EngineConfig, worker: Worker) -> None:
        self.config = config
        self.worker = worker
        self.kv = KVCacheManager(worker.num_kv_blocks, config.block_size)
        self.queue = Scheduler(config, self.kv)  # used for its FCFS prompt admission only
        self.stop = StopChecker(worker.eos_token_ids, worker.max_model_len)
        self.requests: dict[str, Request] = {}
        self.holding: dict[str, Request] = {}  # first token out, KV waiting to be pulled

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, prompt_token_ids, params, arrival_time)
        self.requests[request_id] = req
        self.queue.add(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.queue.waiting)

    @property
    def num_queued_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.queue.waiting)

    def step(self) -> tuple[list[RequestOutput], list[MigrationTicket]]:
        batch = SchedulerOutput()
        self.queue.admit_prompts(batch, self.config.max_num_batched_tokens, chunk=False)
        if batch.is_empty:
            return [], []
        result = self.worker.runner.run(batch.prefills, [])
        for req, n in batch.prefills:
            req.num_computed_tokens += n
            self.queue.running.remove(req)
        samples = sample(result.logits, result.sampled)
        detoks = {r.request_id: IncrementalDetokenizer(self.worker.tokenizer, r.prompt_token_ids)
                  for r in result.sampled}
        outputs = apply_samples(result.sampled, samples, detoks, self.stop)
        tickets = []
        for req, out in zip(result.sampled, outputs):
            if req.is_finished:  # EOS or max_tokens=1: nothing left to decode
                self.kv.free(req)
                del self.requests[req.request_id]
                continue
            req.status = RequestStatus.RUNNING
            self.holding[req.request_id] = req
            tickets.append(MigrationTicket(
                req.request_id, req.prompt_token_ids, req.output_token_ids[0], out.new_text,
                req.output_logprobs[0] if req.output_logprobs else None,
                list(req.block_table), req.arrival_time, req.first_token_time))
        return outputs, tickets

    def release(self, request_id: str) -> None:
        """The decode instance has its copy: free the blocks."""
        req = self.holding.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
            self.requests.pop(request_id, None)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.holding.pop(request_id, None)
        self.queue.abort(request_id)
        self.kv.free(req)
        req.finish(FinishReason.ABORT)
        return RequestOutput(request_id, [], "", True, "abort", arrival_time=req.arrival_time,
                             num_prompt_tokens=req.num_prompt_tokens, finish_time=time.monotonic())
