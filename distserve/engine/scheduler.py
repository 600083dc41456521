"""The scheduler: which requests run in the next step, and how many tokens each.

Each request computes tokens [num_computed_tokens, num_tokens); a step that reaches the
end samples the next token. One role policy per kind of instance:
- prefill: waiting prompts FCFS while their tokens fit the budget (a longer prompt runs
  alone) and the instance's KV memory has room; no decoding here.
- decode: requests whose first token came from a prefill instance wait for their KV
  (WAITING_FOR_KV); they are admitted FCFS when blocks are free, their KV is pulled, and
  then they decode as in a colocated instance.
- colocated, prefill-first (vLLM's default): waiting prompts run first, in a batch of their
  own; otherwise every running request decodes one token.
- colocated, chunked: one token budget per step, decodes first, then chunks of prompts.
When blocks run out, the newest running request is preempted (its blocks freed, its tokens
recomputed later) and goes back to the head of the queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distserve.config import EngineConfig
from distserve.kv.cache_manager import KVCacheManager
from distserve.request import Request, RequestStatus

ROLES = ("prefill", "decode", "colocated")


@dataclass
class SchedulerOutput:
    prefills: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    pulls: list[Request] = field(default_factory=list)  # decode: admitted, KV to pull first

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, role: str = "colocated") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown instance role {role!r}; choose one of {ROLES}")
        self.config = config
        self.kv = kv
        self.role = role
        self.waiting: deque[Request] = deque()
        self.waiting_for_kv: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        queue = self.waiting_for_kv if request.status == RequestStatus.WAITING_FOR_KV else self.waiting
        queue.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.waiting_for_kv, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.kv.free(req)
                    return req
        return None

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)

    def hand_over(self, request: Request) -> None:
        """Prefill: the first token is out; its blocks stay allocated for the decode side."""
        self.running.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.waiting_for_kv or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_for_kv)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.role == "prefill":
            self.admit_prompts(out, self.config.max_num_batched_tokens, chunk=False)
            return out
        if self.role == "decode":
            self._admit_pulls(out)
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

    def _admit_pulls(self, out: SchedulerOutput) -> None:
        """Decode: requests waiting for their KV, FCFS, while blocks and batch room allow;
        the engine pulls their KV before the batch runs, so they count as computed."""
        while self.waiting_for_kv and len(self.running) < self.config.max_num_seqs:
            req = self.waiting_for_kv[0]
            # room for the prompt, the first token and the next one, plus one block of slack
            # per running request so admission does not cause an immediate preemption
            if not self.kv.can_allocate(req, req.num_prompt_tokens + 2, reserve=len(self.running)):
                break
            self.waiting_for_kv.popleft()
            self.kv.allocate(req, req.num_prompt_tokens)
            req.num_computed_tokens = req.num_prompt_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.pulls.append(req)

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

    def recompute(self, req: Request) -> None:
        """A running request's KV is lost (a decode instance's pull failed): its blocks are
        freed and its tokens computed again, first in the queue."""
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.recompute(req)
        req.num_preemptions += 1
        out.preempted.append(req)
        out.decodes = [r for r in out.decodes if r is not req]
