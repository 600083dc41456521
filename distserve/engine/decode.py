"""The decode instance: takes requests over after their first token, pulls their KV, and
decodes them in a continuous batch.

Migrations are admitted FCFS when this instance has free blocks for them; only then is
their KV pulled from the prefill instance (pull-based, so a busy decode instance never
receives KV it has no room for). A request preempted here is recomputed locally.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from distserve.config import EngineConfig
from distserve.engine.colocated import ColocatedEngine
from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.engine.outputs import RequestOutput
from distserve.engine.prefill import MigrationTicket
from distserve.engine.worker import Worker
from distserve.request import Request, RequestStatus, SamplingParams

# pull(source, src_blocks, dst_blocks) -> (bytes moved, seconds)
PullFn = Callable[[str, list[int], list[int]], tuple[int, float]]


@dataclass
class Migration:
    ticket: MigrationTicket
    params: SamplingParams
    source: str  # which prefill instance holds the KV


@dataclass
class MigrationDone:
    request_id: str
    source: str
    nbytes: int
    seconds: float


class DecodeEngine(ColocatedEngine):
    """A colocated engine whose requests arrive with their prompt's KV already computed."""

    def __init__(self, config: EngineConfig, worker: Worker, pull: PullFn) -> None:
        super().__init__(config, worker)
        self.pull = pull
        self.migrations: deque[Migration] = deque()

    def add_migration(self, migration: Migration) -> None:
        self.migrations.append(migration)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.migrations) or self.scheduler.has_work

    @property
    def num_waiting(self) -> int:
        return len(self.migrations) + len(self.scheduler.waiting)

    def abort(self, request_id: str) -> RequestOutput | None:
        for m in self.migrations:
            if m.ticket.request_id == request_id:
                self.migrations.remove(m)
                return RequestOutput(request_id, [], "", True, "abort",
                                     arrival_time=m.ticket.arrival_time,
                                     finish_time=time.monotonic())
        return super().abort(request_id)

    def admit_migrations(self) -> list[MigrationDone]:
        """Pulls the KV of queued requests, in order, while blocks and batch room allow."""
        done = []
        while self.migrations and len(self.scheduler.running) < self.config.max_num_seqs:
            m = self.migrations[0]
            t = m.ticket
            req = Request(t.request_id, t.prompt_token_ids, m.params, t.arrival_time)
            # room for the prompt, the first token and the next one, plus one block of slack
            # per running request so admission does not cause an immediate preemption
            slack = len(self.scheduler.running)
            if not self.kv.can_allocate(req, req.num_prompt_tokens + 2, reserve=slack):
                break
            self.migrations.popleft()
            self.kv.allocate(req, req.num_prompt_tokens)
            nbytes, seconds = self.pull(m.source, t.block_ids[:len(req.block_table)], req.block_table)
            req.num_computed_tokens = req.num_prompt_tokens
            req.append_token(t.first_token_id, t.first_logprob, t.first_token_time)
            req.status = RequestStatus.RUNNING
            self.requests[req.request_id] = req
            detok = self.detoks[req.request_id] = IncrementalDetokenizer(self.tokenizer,
                                                                         req.prompt_token_ids)
            detok.add(t.first_token_id)  # its text was streamed by the prefill instance
            self.scheduler.running.append(req)
            done.append(MigrationDone(req.request_id, m.source, nbytes, seconds))
        return done
