"""The controller: dispatches requests to instance processes and streams their tokens back.

Disaggregated: a request goes to the prefill instance with the fewest queued prompt tokens;
when its first token is out, to the decode instance with the fewest requests, which pulls
its KV; once the copy is confirmed the prefill instance frees its blocks. Colocated: to the
instance with the fewest requests. An abort reaches every instance that may hold the
request, so its blocks are freed wherever they are, mid-transfer included.
An instance that dies or stops sending heartbeats is taken out of dispatch; the requests it
held run again on the others (cluster/recovery.py: the stream continues where it was), and
the launcher starts it again with a back-off (cluster/supervision.py). Only a request with
no instance of its role left ends in an error.
It implements the same EngineClient interface as AsyncEngine; it holds no tensors.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from distserve.cluster import messages as m
from distserve.cluster.failover import Failover
from distserve.cluster.launcher import InstanceHandle, InstanceSpec, Launcher
from distserve.cluster.messages import EngineStats, RequestOutput
from distserve.cluster.recovery import Progress
from distserve.cluster.supervision import Supervisor
from distserve.dispatch import least_loaded
from distserve.engine.async_engine import EngineDeadError, RequestStream
from distserve.models.locate import locate_model
from distserve.request import SamplingParams, fit_to_context
from distserve.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 5.0
STEP_SAMPLES_KEPT = 16384   # per instance: minutes of decode steps on a CPU


@dataclass
class _Tracked:
    request_id: str
    outputs: asyncio.Queue
    params: SamplingParams      # as the client asked
    progress: Progress
    run_params: SamplingParams | None = None   # of the current run (a re-run asks for less)
    queued: int = 0             # prompt tokens counted on its prefill instance
    prefill: str | None = None
    prefilled: bool = False     # the first token is out (no longer in a prefill queue)
    decode: str | None = None
    migrated: bool = False      # its decode instance holds the KV: the prefill side is free
    ticket_at: float | None = None   # when its KV was offered to a decode instance
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    former: set = field(default_factory=set)  # instances it left: their late outputs are stale


@dataclass
class _Instance:
    spec: InstanceSpec
    process: InstanceHandle
    ready: m.Ready | None = None
    socket: zmq.asyncio.Socket | None = None
    stats: m.Stats | None = None
    load: int = 0            # requests assigned and not finished (decode / colocated)
    queued_tokens: int = 0   # prompt tokens dispatched, first token not out yet (prefill)
    switching_to: str | None = None   # draining to switch roles: takes no new request
    # (time received, sample) of its recent one-phase steps (switchable instances only)
    steps: deque = field(default_factory=lambda: deque(maxlen=STEP_SAMPLES_KEPT))


class Controller(Failover):
    def __init__(self, specs: list[InstanceSpec], model: str | None, launcher: Launcher,
                 transfer: str = "shm", host: str = "127.0.0.1",
                 ready_timeout_s: float = 600.0, kv_lease_s: float = 120.0) -> None:
        roles = {s.role for s in specs}
        if roles not in ({"prefill", "decode"}, {"colocated"}):
            raise ValueError("a deployment is prefill + decode instances, or colocated ones; "
                             f"got roles {sorted(roles)}")
        self.specs = specs
        self.launcher = launcher
        self.sealer = m.Sealer.new()  # this deployment's secret, handed to each instance
        self.disaggregated = "prefill" in roles
        self.model = model
        self.model_name = locate_model(model)[0]
        self.tokenizer = None  # loaded by start(), while the instances load their models
        self.transfer = transfer
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.instances: dict[str, _Instance] = {}
        self.requests: dict[str, _Tracked] = {}
        self.max_model_len = 0
        self.vocab_size = 0
        self._ctx = zmq.asyncio.Context()
        self._inbox: zmq.asyncio.Socket | None = None
        self.address = ""   # where instances send to (tcp://host:port), once started
        self._receiver: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._error: str | None = None
        self.supervisor = Supervisor({s.instance_id: s.role for s in specs},
                                     ready_timeout_s=ready_timeout_s)
        self.num_reruns = 0
        self.num_kv_recomputes = 0   # prompts a decode instance computed after a failed pull
        self.kv_lease_s = kv_lease_s   # a ticket not pulled by then: the KV is taken back
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.num_transfers = 0
        self.num_dropped_messages = 0
        self.num_role_switches = 0
        self._switched: dict[str, asyncio.Future] = {}   # instance -> its RoleSwitched answer

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._inbox = self._ctx.socket(zmq.PULL)
        port = self._inbox.bind_to_random_port(f"tcp://{self.host}")
        self.address = f"tcp://{self.host}:{port}"
        for spec in self.specs:
            self.instances[spec.instance_id] = _Instance(
                spec, self.launcher.start(spec, self.address, self.transfer,
                                          self.sealer.secret))
        tokenizer = asyncio.create_task(asyncio.to_thread(load_tokenizer, self.model))
        await self._wait_ready()
        self.tokenizer = await tokenizer
        readies = [i.ready for i in self.instances.values()]
        self.vocab_size = readies[0].vocab_size
        # a request must fit each instance's KV cache on its own, and the model's context
        self.max_model_len = min(min(r.max_model_len, r.num_kv_blocks * r.block_size) for r in readies)
        now = time.monotonic()   # heartbeats queued while the tokenizer loaded are not late
        for iid in self.instances:
            self.supervisor.beat(iid, now)
        self._receiver = asyncio.create_task(self._receive_loop())
        self._watchdog = asyncio.create_task(self._watch())

    async def shutdown(self) -> None:
        for task in (self._receiver, self._watchdog):
            if task is not None:
                task.cancel()
        self._receiver = self._watchdog = None
        for iid, inst in self.instances.items():
            if inst.socket is not None and self.supervisor.is_up(iid):
                await self._push(inst, m.Shutdown())
        for inst in self.instances.values():
            await asyncio.to_thread(inst.process.stop)
            if inst.socket is not None:
                inst.socket.close()
        if self._inbox is not None:
            self._inbox.close()
        close_launcher = getattr(self.launcher, "close", None)
        if close_launcher is not None:   # a cluster's launcher frees what it reserved
            close_launcher()
        self._error = self._error or "shut down"
        self._fail_all(EngineDeadError("the controller shut down"))

    @property
    def is_healthy(self) -> bool:
        """Serving: every role has an instance up (some may be restarting: degraded)."""
        return (self._error is None and self._receiver is not None
                and self.supervisor.health()["status"] != "down")

    def health(self) -> dict:
        return self.supervisor.health() if self._error is None else {"status": "down", "error": self._error}

    # ------------------------------------------------------------------ requests
    def check_request(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        return fit_to_context(ids, params, self.max_model_len, self.vocab_size)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> RequestStream:
        if not self.is_healthy:
            missing = ", ".join(self.supervisor.health().get("missing", []))
            raise EngineDeadError(f"the deployment is not running ({self._error or 'no instance of a role is up: ' + missing})")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = self.check_request(ids, params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        tracked = _Tracked(request_id, asyncio.Queue(), params, Progress(ids, time.monotonic()))
        self.requests[request_id] = tracked
        await self._dispatch(tracked, ids, params)
        return RequestStream(request_id, tracked.outputs, self._on_stream_closed)

    async def _dispatch(self, tracked: _Tracked, ids: list[int], params: SamplingParams,
                        resume: m.Resume | None = None) -> None:
        role = "prefill" if self.disaggregated else "colocated"
        target = self._least_loaded(role)
        if self.disaggregated:
            target.queued_tokens += len(ids)
            tracked.queued, tracked.prefill = len(ids), target.spec.instance_id
        else:
            target.load += 1
            tracked.decode = target.spec.instance_id
        arrival = tracked.progress.arrival_time
        tracked.run_params = params
        await self._push(target, m.AddRequest(tracked.request_id, ids, params, arrival, resume))

    def _serving(self, role: str) -> list[_Instance]:
        """The instances of `role` that take new requests: up, and not draining to switch."""
        return [i for iid, i in self.instances.items()
                if i.spec.role == role and i.switching_to is None and self.supervisor.is_up(iid)]

    def _least_loaded(self, role: str) -> _Instance | None:
        pool = self._serving(role)
        if not pool:
            return None
        return pool[least_loaded([i.queued_tokens if role == "prefill" else i.load for i in pool])]

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        if not finished:
            asyncio.get_event_loop().create_task(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        tracked = self._forget(request_id)
        if tracked is None:
            return
        for iid in {tracked.prefill, tracked.decode} - {None}:
            await self._send(iid, m.Abort(request_id))
        tracked.outputs.put_nowait(RequestOutput(request_id, [], "", True, "abort"))

    async def _send(self, iid: str, msg) -> None:
        """A command to an instance that is up (one that is down has nothing to act on)."""
        if self.supervisor.is_up(iid):
            await self._push(self.instances[iid], msg)

    async def _push(self, inst: _Instance, msg) -> None:
        """Every command is sent with a bound: an instance that takes none for SEND_TIMEOUT_S
        (its queue is full: it is wedged) loses the command, and its silence gets it
        replaced; the controller never waits on it for good."""
        try:
            frame = self.sealer.seal(msg, to=inst.ready.nonce)
            await asyncio.wait_for(inst.socket.send(frame), SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("instance %s took no command for %g s; dropped a %s", inst.spec.instance_id,
                      SEND_TIMEOUT_S, type(msg).__name__)

    def _forget(self, request_id: str) -> _Tracked | None:
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return None
        self._unassign(tracked)
        return tracked

    def _unassign(self, tracked: _Tracked) -> None:
        """The request leaves its instances' loads (it finished, was aborted, or runs again)."""
        if self.disaggregated and tracked.prefill and not tracked.prefilled:
            self.instances[tracked.prefill].queued_tokens -= tracked.queued
        if tracked.decode:
            self.instances[tracked.decode].load -= 1

    # ------------------------------------------------------------------ messages from instances
    def _decode(self, data: bytes) -> m.ToController | None:
        """A message from one of our instances, or None: a frame that is not signed with the
        deployment's secret or does not decode, or that names an instance this deployment
        does not have, is dropped and counted, so a stranger's packet on the inbox can never
        end the receive loop or speak for an instance."""
        try:
            msg = self.sealer.open_for_controller(data)
        except m.BadFrame as e:
            reason = str(e)
        else:
            unknown = {msg.instance_id} | {d.source for d in getattr(msg, "done", ())}
            unknown -= set(self.instances)
            if not unknown:
                return msg
            reason = f"{type(msg).__name__} naming unknown instance(s) {sorted(unknown)}"
        self.num_dropped_messages += 1
        log.warning("controller dropped a message: %s", reason)
        return None

    async def _receive_loop(self) -> None:
        try:
            while True:
                msg = self._decode(await self._inbox.recv())
                if msg is not None:
                    await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave clients hanging
            log.exception("controller receive loop failed")
            self._error = f"controller failed: {e}"
            self._fail_all(EngineDeadError(self._error))

    async def _handle(self, msg) -> None:
        if isinstance(msg, m.Outputs):
            for out in msg.outputs:
                self._deliver(msg.instance_id, out)
        elif isinstance(msg, m.Tickets):
            for ticket in msg.tickets:
                await self._migrate(msg.instance_id, ticket)
        elif isinstance(msg, m.Migrated):
            for done in msg.done:
                await self._send(done.source, m.Release(done.request_id))
                self.transfer_bytes += done.nbytes
                self.transfer_seconds += done.seconds
                self.num_transfers += 1
                tracked = self.requests.get(done.request_id)
                if tracked is not None and tracked.decode == msg.instance_id:
                    tracked.migrated = True
                    tracked.transfer_bytes += done.nbytes
                    tracked.transfer_seconds += done.seconds
        elif isinstance(msg, m.Heartbeat):
            self.supervisor.beat(msg.instance_id, time.monotonic())
        elif isinstance(msg, m.Stats):
            if self.supervisor.is_up(msg.instance_id):
                inst = self.instances[msg.instance_id]
                inst.stats = msg
                now = time.monotonic()
                inst.steps.extend((now, s) for s in msg.steps)
        elif isinstance(msg, m.Ready):
            if self.supervisor.is_starting(msg.instance_id):
                self._attach(msg)
        elif isinstance(msg, m.PullFailed):
            tracked = self.requests.get(msg.request_id)
            if tracked is not None and tracked.decode == msg.instance_id and msg.recomputed:
                log.warning("%s computes %s's prompt itself: its KV pull failed (%s)",
                            msg.instance_id, msg.request_id, msg.message)
                tracked.migrated = True   # its KV is the decode instance's own now
                self.num_kv_recomputes += 1
                if tracked.prefill is not None:
                    await self._send(tracked.prefill, m.Release(msg.request_id))
            elif tracked is not None and tracked.decode == msg.instance_id:
                tracked.decode = None   # it dropped the request and freed its blocks
                self.instances[msg.instance_id].load -= 1
                await self._rerun(tracked, f"its KV pull failed ({msg.message})")
        elif isinstance(msg, m.Rejected):
            tracked = self._forget(msg.request_id)
            if tracked is not None:
                tracked.outputs.put_nowait(ValueError(msg.message))
        elif isinstance(msg, m.RoleSwitched):
            waiter = self._switched.pop(msg.instance_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
        elif isinstance(msg, m.Failed):   # it could not start again: it is down
            if self.supervisor.is_starting(msg.instance_id):
                self.supervisor.down(msg.instance_id, time.monotonic(), msg.message)

    def _deliver(self, instance_id: str, out: RequestOutput) -> None:
        tracked = self.requests.get(out.request_id)
        if tracked is None:
            return  # aborted: its stream is gone
        if instance_id not in (tracked.prefill, tracked.decode):
            if instance_id in tracked.former:
                return  # sent before it was taken off this request
            self.num_dropped_messages += 1  # only the instances that hold it speak for it
            log.warning("controller dropped an output for %s from %s, which does not hold it",
                        out.request_id, instance_id)
            return
        if self.disaggregated and not tracked.prefilled:
            self.instances[instance_id].queued_tokens -= tracked.queued
            tracked.prefilled = True
        out = tracked.progress.seen(out)
        if out.finished:
            self.requests.pop(out.request_id, None)
            if tracked.decode:
                self.instances[tracked.decode].load -= 1
            out.extra["kv_transfer_bytes"] = tracked.transfer_bytes
            out.extra["kv_transfer_seconds"] = tracked.transfer_seconds
        tracked.outputs.put_nowait(out)

    async def _migrate(self, source: str, ticket) -> None:
        tracked = self.requests.get(ticket.request_id)
        if tracked is None:  # aborted after its first token: the prefill side was told
            return
        if tracked.prefill != source:
            return  # a ticket from an instance the request has left
        target = self._least_loaded("decode")
        if target is None:   # every decode instance is down: free the KV, fail the request
            await self._send(source, m.Release(ticket.request_id))
            self._forget(ticket.request_id)
            missing = ", ".join(self.supervisor.health()["missing"])
            tracked.outputs.put_nowait(EngineDeadError(f"request {ticket.request_id} was lost: "
                                                       f"no decode instance is up ({missing} down)"))
            return
        target.load += 1
        tracked.decode, tracked.ticket_at = target.spec.instance_id, time.monotonic()
        endpoint = self.instances[source].ready.endpoint
        await self._push(target, m.AddMigration(ticket, tracked.run_params, source, endpoint))

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.requests):
            tracked = self.requests.pop(request_id)
            tracked.outputs.put_nowait(error)

    # ------------------------------------------------------------------ roles
    def holds_requests(self, iid: str) -> bool:
        """Whether any request is still on the instance: queued, running, or (prefill) its KV
        not yet pulled by a decode instance."""
        inst = self.instances[iid]
        return inst.load > 0 or inst.queued_tokens > 0 or any(
            t.prefill == iid and not t.migrated for t in self.requests.values())

    async def switch_role(self, iid: str, role: str, timeout_s: float = 120.0,
                          poll_s: float = 0.05) -> None:
        """Moves instance `iid` to `role` in place: it takes no new request, the ones it
        holds finish (their KV pulled away), then it builds an engine of the new role over
        its loaded model and cache, and dispatch counts it in its new role. Raises ValueError
        for a switch that cannot be made (the last instance of its role, one not started
        switchable), TimeoutError when it does not drain in time (it keeps its role)."""
        inst = self.instances.get(iid)
        if inst is None:
            raise ValueError(f"no instance {iid!r}")
        old = inst.spec.role
        if role not in ("prefill", "decode") or not self.disaggregated:
            raise ValueError(f"roles switch between prefill and decode; {iid} is {old}, asked {role!r}")
        if not inst.spec.switchable:
            raise ValueError(f"{iid} was not started switchable (serve --adapt)")
        if role == old or inst.switching_to is not None:
            raise ValueError(f"{iid} is {old}{' and switching' if inst.switching_to else ''}")
        if len(self._serving(old)) < 2:
            raise ValueError(f"{iid} is the last {old} instance up")
        inst.switching_to = role
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                while self.holds_requests(iid):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{iid} did not drain in {timeout_s:g} s")
                    await asyncio.sleep(poll_s)
                waiter = asyncio.get_running_loop().create_future()
                self._switched[iid] = waiter
                await self._send(iid, m.SwitchRole(role))
                answer = await asyncio.wait_for(waiter, max(1.0, deadline - time.monotonic()))
                if not answer.error:
                    break
                if time.monotonic() > deadline:   # e.g. a release still on its way
                    raise TimeoutError(f"{iid} kept its role: {answer.error}")
                await asyncio.sleep(poll_s)
            inst.spec.role = role
            inst.ready.role = role
            inst.ready.endpoint = answer.endpoint
            self.supervisor.members[iid].role = role
            self.num_role_switches += 1
            log.warning("%s switched from %s to %s", iid, old, role)
        finally:
            self._switched.pop(iid, None)
            inst.switching_to = None

    def switch_candidate(self, role: str) -> str | None:
        """The switchable instance of `role` with the least work, if one can be spared."""
        pool = self._serving(role)
        movable = [i for i in pool if i.spec.switchable]
        if len(pool) < 2 or not movable:
            return None
        return min(movable, key=lambda i: (i.queued_tokens, i.load)).spec.instance_id

    def roles(self) -> dict[str, int]:
        """Instances per role (those switching counted in their new role)."""
        out: dict[str, int] = {}
        for inst in self.instances.values():
            r = inst.switching_to or inst.spec.role
            out[r] = out.get(r, 0) + 1
        return out

    # ------------------------------------------------------------------ numbers
    def stats(self) -> EngineStats:
        stats = [i.stats for i in self.instances.values() if i.stats is not None]
        blocks = sum(s.num_blocks for s in stats)
        free = sum(s.num_free_blocks for s in stats)
        return EngineStats(
            num_running=sum(s.num_running for s in stats if s.role != "prefill"),
            num_waiting=sum(s.num_waiting for s in stats),
            kv_usage=(blocks - free) / blocks if blocks else 0.0,
            num_free_blocks=free, num_blocks=blocks)

    def predict_ttft(self, num_tokens: int) -> float | None:
        """Queueing plus prefill of a new prompt on the instance it would go to."""
        target = self._least_loaded("prefill" if self.disaggregated else "colocated")
        if target is None or target.stats is None:
            return None
        queued = target.queued_tokens if self.disaggregated else target.stats.queued_tokens
        return m.predicted_ttft(queued, num_tokens, target.stats.prefill_seconds_per_token)

    def counts(self) -> dict[str, int]:
        """Reliability events since start (server/metrics.RELIABILITY says what each is)."""
        return {"internal_messages_dropped": self.num_dropped_messages,
                "instance_failures": self.supervisor.num_failures,
                "instance_restarts": self.supervisor.num_restarts, "requests_rerun": self.num_reruns,
                "kv_pulls_recomputed": self.num_kv_recomputes,
                "role_switches": self.num_role_switches}

    def recent_steps(self, since: float) -> list[m.StepSample]:
        """Every instance's one-phase steps received at or after `since` (time.monotonic())."""
        return [s for i in self.instances.values() for t, s in i.steps if t >= since]

    def instance_stats(self) -> list[m.Stats]:
        return [i.stats for i in self.instances.values() if i.stats is not None]
