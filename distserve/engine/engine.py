"""An instance's engine, one contract for all three roles (prefill, decode, colocated):

    add(prompt, params, request_id, arrival_time, migration) -> Request
    abort(request_id) -> RequestOutput | None
    release(request_id)                      the decode side has its copy of the KV
    step() -> StepOutput(outputs, kv_ready, kv_pulled)
    stats() -> EngineStats

A step reads like the algorithm: schedule -> pull the KV of admitted migrations -> execute
(the executor runs the model and samples) -> postprocess -> finish, or hand over. The roles differ only in whom the
scheduler admits (scheduler.py's role policies) and in what follows a request's first token
on a prefill instance: its KV is held until a decode instance has pulled it. The KV memory
a prefill instance holds is the buffer that absorbs bursts when decoding falls behind.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from distserve.cluster.messages import (EngineStats, MigrationDone, MigrationTicket,
                                        RequestOutput, Resume)
from distserve.config import EngineConfig
from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.engine.executor import Executor, load_executor
from distserve.engine.postprocess import StopChecker, apply_samples
from distserve.engine.sampler import SampleResult
from distserve.engine.scheduler import ROLES, Scheduler
from distserve.kv.cache_manager import KVCacheManager
from distserve.request import FinishReason, Request, RequestStatus, SamplingParams
from distserve.transfer.base import TransferError
from distserve.transfer.checksum import block_checksums, verify_blocks

# pull(source, src_blocks, dst_blocks) -> (bytes moved, seconds)
PullFn = Callable[[str, list[int], list[int]], tuple[int, float]]


@dataclass
class Migration:
    """A request a decode instance takes over after its first token: where its KV is."""

    ticket: MigrationTicket
    source: str  # the prefill instance that holds the KV


@dataclass
class StepOutput:
    outputs: list[RequestOutput] = field(default_factory=list)
    kv_ready: list[MigrationTicket] = field(default_factory=list)  # prefill: KV held to pull
    kv_pulled: list[MigrationDone] = field(default_factory=list)   # decode: the source may free
    kv_failed: list[tuple[str, str]] = field(default_factory=list)  # decode: (request, why) dropped
    kv_recomputed: list[tuple[str, str]] = field(default_factory=list)  # decode: computed here


class Engine:
    def __init__(self, config: EngineConfig | None = None, executor: Executor | None = None,
                 role: str = "colocated", pull: PullFn | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown instance role {role!r}; choose one of {ROLES}")
        if (pull is not None) != (role == "decode"):
            raise ValueError("a decode engine needs a pull function, and only a decode engine")
        self.config = config or EngineConfig()
        self.role = role
        self.executor = executor or load_executor(self.config)
        self.tokenizer = self.executor.tokenizer
        self.pull = pull
        # a request must fit the KV cache on its own, or it would be preempted forever
        self.max_model_len = min(self.executor.max_model_len,
                                 self.executor.num_kv_blocks * self.config.block_size)
        self.kv = KVCacheManager(self.executor.num_kv_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.config, self.kv, role)
        self.stop = StopChecker(self.executor.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.migrations: dict[str, Migration] = {}  # decode: waiting for its KV
        self.held: dict[str, Request] = {}          # prefill: first token out, KV not pulled
        self._ids = itertools.count()
        self._prefill_s_per_token = 0.0   # EWMA over steps with prompt tokens (for --reject-late)

    @property
    def model_name(self) -> str:
        return self.executor.model_name

    @property
    def vocab_size(self) -> int:
        return self.executor.vocab_size

    # ---------------------------------------------------------------- the contract
    def add(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
            arrival_time: float | None = None, migration: Migration | None = None,
            resume: Resume | None = None) -> Request:
        """Queues a request; a decode engine takes each one with the migration that says
        where its KV is; a re-run comes with what its earlier run generated (`resume`).
        Raises ValueError for one that can never run here."""
        if (migration is not None) != (self.role == "decode"):
            raise ValueError(f"a {self.role} instance takes "
                             f"{'migrations only' if self.role == 'decode' else 'no migrations'}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params, arrival_time)
        if migration is not None:
            t = migration.ticket
            resume = Resume(t.resumed_tokens, t.emitted_chars)
        detok = self._detokenizer(req, resume)
        if migration is not None:
            req.append_token(t.first_token_id, t.first_logprob, t.first_token_time)
            req.status = RequestStatus.WAITING_FOR_KV
            detok.add(t.first_token_id)  # its text was streamed by the prefill instance
            detok.emitted = min(t.emitted_chars, len(detok.text))
            self.migrations[rid] = migration
        self.requests[rid] = req
        self.detoks[rid] = detok
        self.scheduler.add(req)
        return req

    def _detokenizer(self, req: Request, resume: Resume | None) -> IncrementalDetokenizer:
        """The request's detokeniser; for a re-run, with the earlier run's outputs (the
        prompt's last tokens) as output text, of which what was streamed counts as sent."""
        ids = req.prompt_token_ids
        k = resume.num_tokens if resume is not None else 0
        if not 0 <= k < len(ids):
            raise ValueError(f"a re-run of {len(ids)} prompt tokens cannot resume {k} outputs")
        detok = IncrementalDetokenizer(self.tokenizer, ids[:len(ids) - k])
        for token in ids[len(ids) - k:]:
            detok.add(token)
        if resume is not None:
            detok.emitted = max(0, min(resume.emitted_chars, len(detok.text)))
        req.num_resumed_tokens = k
        return detok

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context (the model's, or the "
                             f"whole KV cache's) is {self.max_model_len} tokens, including at "
                             "least one generated")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request wherever it is and frees its blocks; None if it is not here."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        if self.held.pop(request_id, None) is not None:
            self.kv.free(req)
        self.migrations.pop(request_id, None)
        self.detoks.pop(request_id, None)
        req.finish(FinishReason.ABORT)
        return RequestOutput(request_id, [], "", True, "abort",
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_output_tokens=len(req.output_token_ids),
                             arrival_time=req.arrival_time, finish_time=time.monotonic())

    def release(self, request_id: str) -> None:
        """Prefill: a decode instance has its copy of the KV, so the blocks are free."""
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
            self.requests.pop(request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> StepOutput:
        batch = self.scheduler.schedule()
        out = StepOutput()
        for req in batch.pulls:
            self._pull(req, out)
        if out.kv_failed or out.kv_recomputed:   # dropped, or back in the queue
            batch.decodes = [r for r in batch.decodes if r.status == RequestStatus.RUNNING]
        if batch.is_empty:
            return out
        steps = self._steps_ahead(batch)
        if steps is not None:
            self._decode_ahead(batch.decodes, steps, out)
            return out
        started = time.perf_counter()
        result = self.executor.execute(batch.prefills, batch.decodes)
        prompt_tokens = sum(n for _, n in batch.prefills)
        if prompt_tokens:
            rate = (time.perf_counter() - started) / prompt_tokens
            old = self._prefill_s_per_token
            self._prefill_s_per_token = rate if not old else 0.7 * old + 0.3 * rate
        for req, n in batch.prefills:
            req.num_computed_tokens += n
        for req in batch.decodes:
            req.num_computed_tokens += 1
        if not result.sampled:
            return out
        out.outputs = apply_samples(result.sampled, result.samples, self.detoks, self.stop)
        self._settle(result.sampled, out.outputs, out)
        return out

    def _settle(self, sampled: list[Request], outputs: list[RequestOutput], out: StepOutput) -> None:
        """After a token each: the finished requests leave, a prefill instance holds the rest."""
        for req, output in zip(sampled, outputs):
            if req.is_finished:
                self.scheduler.finish(req)
                self.requests.pop(req.request_id, None)
                self.detoks.pop(req.request_id, None)
            elif self.role == "prefill":
                out.kv_ready.append(self._hold(req, output.new_text))

    # ---------------------------------------------------------------- several steps a call
    def _steps_ahead(self, batch) -> list[int] | None:
        """The tokens each request of this batch gets from one executor call (as vLLM's
        multi-step scheduling; up to num_scheduler_steps), or None for one step as usual. Only
        a decode-only batch while nothing waits to be admitted, every request greedy without
        logprobs, on an executor that can, gets more than one: each never past its max_tokens
        or the context (a request with fewer left stops inside the call, the others go on),
        and fewer a call where the free blocks cannot hold the slots."""
        limit = self.config.num_scheduler_steps
        if (limit == 1 or batch.prefills or not batch.decodes or self.scheduler.num_waiting
                or not getattr(self.executor, "can_decode_ahead", False)):
            return None
        if any(not r.sampling_params.greedy or r.sampling_params.logprobs is not None
               for r in batch.decodes):
            return None
        left = [self.stop.tokens_left(r) for r in batch.decodes]
        free = self.kv.allocator.num_free
        while limit > 1:
            steps = [max(1, min(limit, n)) for n in left]
            need = sum(self.kv.num_new_blocks(r, r.num_tokens + n - 1)
                       for r, n in zip(batch.decodes, steps))
            if max(steps) > 1 and need <= free:
                return steps
            limit = min(limit, max(steps)) - 1
        return None

    def _decode_ahead(self, decodes: list[Request], steps: list[int], out: StepOutput) -> None:
        """Each request's tokens from one executor call, applied one step at a time as if each
        had run alone: a request that stops drops its later tokens. The step trace sees each
        step of the call, an equal share of its time, at that step's contexts."""
        for req, n in zip(decodes, steps):
            self.kv.allocate(req, req.num_tokens + n - 1)
        start = time.monotonic()
        tokens = self.executor.decode_ahead(decodes, steps)
        share = (time.monotonic() - start) / max(steps)
        for s in range(max(steps)):
            live = [(req, row[s]) for req, row in zip(decodes, tokens) if not req.is_finished]
            if not live:
                break
            sampled = [req for req, _ in live]
            if self.executor.on_step is not None:   # as the runner reports a step
                self.executor.on_step(start + s * share, start + (s + 1) * share, [], sampled)
            for req in sampled:
                req.num_computed_tokens += 1
            outputs = apply_samples(sampled, SampleResult([t for _, t in live], None, None),
                                    self.detoks, self.stop)
            out.outputs.extend(outputs)
            self._settle(sampled, outputs, out)

    def stats(self) -> EngineStats:
        prefill = self.role == "prefill"
        alloc = self.kv.allocator
        return EngineStats(
            num_running=len(self.held) if prefill else len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting, kv_usage=self.kv.usage,
            num_free_blocks=alloc.num_free, num_blocks=alloc.num_blocks,
            queued_tokens=self.scheduler.num_waiting_tokens if self.role != "decode" else 0,
            prefill_seconds_per_token=self._prefill_s_per_token)

    # ---------------------------------------------------------------- the hand-over
    def _pull(self, req: Request, out: StepOutput) -> None:
        """The request's KV from its source, tried twice. A pull that still fails is the
        request's alone: its prompt is computed here (kv_pull_failure "recompute", as a
        preempted request's is), or it is dropped here, blocks freed, to run again through a
        prefill instance ("rerun"); either way it says why."""
        m = self.migrations[req.request_id]
        # the prompt's blocks; the table may already hold one more, for the next token's slot
        # (a prompt of whole blocks), which has no KV to pull
        n = min(len(m.ticket.block_ids), len(req.block_table))
        src, dst = m.ticket.block_ids[:n], req.block_table[:n]
        for _ in range(2):
            try:
                nbytes, seconds = self.pull(m.source, src, dst)
                if m.ticket.block_checksums is not None:
                    verify_blocks(self.executor.kv_cache, dst, m.ticket.block_checksums[:n])
            except TransferError as e:
                error = e
                continue
            self.migrations.pop(req.request_id)
            out.kv_pulled.append(MigrationDone(req.request_id, m.source, nbytes, seconds))
            return
        if self.config.kv_pull_failure == "recompute":
            self.migrations.pop(req.request_id)
            self.scheduler.recompute(req)
            out.kv_recomputed.append((req.request_id, str(error)))
            return
        self.abort(req.request_id)
        out.kv_failed.append((req.request_id, str(error)))

    def _hold(self, req: Request, first_text: str) -> MigrationTicket:
        self.scheduler.hand_over(req)
        self.held[req.request_id] = req
        emitted = self.detoks.pop(req.request_id).emitted
        return MigrationTicket(
            req.request_id, req.prompt_token_ids, req.output_token_ids[0], first_text,
            req.output_logprobs[0] if req.output_logprobs else None, list(req.block_table),
            req.arrival_time, req.first_token_time,
            block_checksums(self.executor.kv_cache, req.block_table) if self.config.kv_checksum else None,
            req.num_resumed_tokens, emitted)
