"""The colocated instance: prefill and decode in one continuous batch (the baseline).

One step reads like the algorithm: schedule -> run the model -> sample -> postprocess.
"""
from __future__ import annotations

import itertools
import time

from distserve.config import EngineConfig
from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.engine.outputs import RequestOutput
from distserve.engine.postprocess import StopChecker, apply_samples
from distserve.engine.sampler import sample
from distserve.engine.scheduler import Scheduler
from distserve.engine.worker import Worker, load_worker
from distserve.kv.cache_manager import KVCacheManager
from distserve.request import FinishReason, Request, SamplingParams


class ColocatedEngine:
    def __init__(self, config: EngineConfig | None = None, worker: Worker | None = None) -> None:
        self.config = config or EngineConfig()
        self.worker = worker or load_worker(self.config)
        self.tokenizer = self.worker.tokenizer
        # a request must fit the KV cache on its own, or it would be preempted forever
        self.max_model_len = min(self.worker.max_model_len,
                                 self.worker.num_kv_blocks * self.config.block_size)
        self.kv = KVCacheManager(self.worker.num_kv_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.config, self.kv)
        self.stop = StopChecker(self.worker.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    @property
    def model_name(self) -> str:
        return self.worker.model_name

    @property
    def vocab_size(self) -> int:
        return self.worker.model.args.vocab_size

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params, arrival_time)
        self.requests[rid] = req
        self.detoks[rid] = IncrementalDetokenizer(self.tokenizer, ids)
        self.scheduler.add(req)
        return req

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context (the model's, or the "
                             f"whole KV cache's) is {self.max_model_len} tokens, including at "
                             "least one generated")
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        self.detoks.pop(request_id, None)
        req.finish(FinishReason.ABORT)
        return RequestOutput(request_id, [], "", True, "abort",
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_output_tokens=len(req.output_token_ids),
                             arrival_time=req.arrival_time, finish_time=time.monotonic())

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        result = self.worker.runner.run(batch.prefills, batch.decodes)
        for req, n in batch.prefills:
            req.num_computed_tokens += n
        for req in batch.decodes:
            req.num_computed_tokens += 1
        if not result.sampled:
            return []
        samples = sample(result.logits, result.sampled)
        outputs = apply_samples(result.sampled, samples, self.detoks, self.stop)
        for req in result.sampled:
            if req.is_finished:
                self.scheduler.finish(req)
                self.requests.pop(req.request_id, None)
                self.detoks.pop(req.request_id, None)
        return outputs

    # -- numbers for /metrics
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        return self.kv.usage
