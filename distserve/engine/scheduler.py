"""The colocated scheduler: which requests run in the next step, and how many tokens each.

Each request computes tokens [num_computed_tokens, num_tokens); a step that reaches the
end samples the next token. Two policies:
- prefill-first (vLLM's default): waiting prompts run first, in a batch of their own;
  otherwise every running request decodes one token.
- chunked: one token budget per step, decodes first, then chunks of prompts fill the rest.
When blocks run out, the newest running request is preempted (its blocks freed, its tokens
recomputed later) and goes back to the head of the queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distserve.config import EngineConfig
from distserve.kv.cache_manager import KVCacheManager
from distserve.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    prefills: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.kv.free(req)
                    return req
        return None

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.config.policy == "prefill-first":
            self.admit_prompts(out, self.config.max_num_batched_tokens, chunk=False)
            if not out.prefills:
                self._schedule_decodes(out)
        else:
            self._schedule_decodes(out)
            budget = self.config.max_num_batched_tokens - out.num_tokens
            self._continue_chunks(out, budget)
            self.admit_prompts(out, self.config.max_num_batched_tokens - out.num_tokens, chunk=True)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        """Give every running request past its prompt one more slot, preempting if needed."""
        for req in list(self.running):
            if req not in self.running or req.num_tokens - req.num_computed_tokens != 1:
                continue
            while not self.kv.can_allocate(req, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self.kv.allocate(req, req.num_tokens)
                out.decodes.append(req)

    def _continue_chunks(self, out: SchedulerOutput, budget: int) -> None:
        """Chunked policy: running requests still inside their prompt get the next chunk."""
        for req in self.running:
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining <= 1 or budget <= 0:
                continue
            n = min(remaining, budget)
            if not self.kv.can_allocate(req, req.num_computed_tokens + n):
                break
            self.kv.allocate(req, req.num_computed_tokens + n)
            out.prefills.append((req, n))
            budget -= n

    def admit_prompts(self, out: SchedulerOutput, budget: int, chunk: bool) -> None:
        """Move waiting requests to running, FCFS, while budget, batch size and blocks allow."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            if chunk:
                n = min(remaining, budget)
            else:  # a prompt longer than the budget runs alone
                n = remaining if (remaining <= budget or not out.prefills) else 0
            if n <= 0 or not self.kv.can_allocate(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.kv.allocate(req, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.prefills.append((req, n))
            budget -= n

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        out.decodes = [r for r in out.decodes if r is not req]
