"""The controller: dispatches requests to instance processes and streams their tokens back.

Disaggregated: a request goes to the prefill instance with the fewest queued prompt tokens;
when its first token is out, to the decode instance with the fewest requests, which pulls
its KV; once the copy is confirmed the prefill instance frees its blocks. Colocated: to the
instance with the fewest requests. An abort reaches every instance that may hold the
request, so its blocks are freed wherever they are, mid-transfer included.
It implements the same EngineClient interface as AsyncEngine; it holds no tensors.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from distserve.cluster import messages as m
from distserve.cluster.launcher import InstanceHandle, InstanceSpec, Launcher
from distserve.cluster.messages import EngineStats, RequestOutput
from distserve.dispatch import least_loaded
from distserve.engine.async_engine import EngineDeadError, RequestStream
from distserve.models.locate import locate_model
from distserve.request import SamplingParams, fit_to_context
from distserve.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    request_id: str
    prompt_len: int
    outputs: asyncio.Queue
    params: SamplingParams
    prefill: str | None = None
    prefilled: bool = False     # the first token is out (no longer in a prefill queue)
    decode: str | None = None
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0


@dataclass
class _Instance:
    spec: InstanceSpec
    process: InstanceHandle
    ready: m.Ready | None = None
    socket: zmq.asyncio.Socket | None = None
    stats: m.Stats | None = None
    load: int = 0            # requests assigned and not finished (decode / colocated)
    queued_tokens: int = 0   # prompt tokens dispatched, first token not out yet (prefill)


class Controller:
    def __init__(self, specs: list[InstanceSpec], model: str | None, launcher: Launcher,
                 transfer: str = "shm", host: str = "127.0.0.1",
                 ready_timeout_s: float = 600.0) -> None:
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
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.num_transfers = 0
        self.num_dropped_messages = 0

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
        self._receiver = asyncio.create_task(self._receive_loop())
        self._watchdog = asyncio.create_task(self._watch())

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = set(self.instances)
        while pending:
            for iid in pending:
                inst = self.instances[iid]
                if not inst.process.alive:
                    await self.shutdown()
                    raise RuntimeError(f"instance {iid} exited while starting:\n"
                                       f"{inst.process.output_tail()}")
            if time.monotonic() > deadline:
                await self.shutdown()
                raise TimeoutError(f"instances {sorted(pending)} not ready after {self.ready_timeout_s} s")
            if not await self._inbox.poll(200):
                continue
            msg = self._decode(await self._inbox.recv())
            if isinstance(msg, m.Failed):
                await self.shutdown()
                raise RuntimeError(f"instance {msg.instance_id} failed to start: {msg.message}")
            if isinstance(msg, m.Ready):
                inst = self.instances[msg.instance_id]
                inst.ready = msg
                inst.stats = m.Stats(msg.instance_id, msg.role, 0, 0, 0, 0.0,
                                     msg.num_kv_blocks, msg.num_kv_blocks)
                inst.socket = self._ctx.socket(zmq.PUSH)
                inst.socket.setsockopt(zmq.LINGER, 1000)
                inst.socket.connect(msg.command_address)
                pending.discard(msg.instance_id)

    async def shutdown(self) -> None:
        for task in (self._receiver, self._watchdog):
            if task is not None:
                task.cancel()
        self._receiver = self._watchdog = None
        for inst in self.instances.values():
            if inst.socket is not None:
                await inst.socket.send(self.sealer.seal(m.Shutdown()))
        for inst in self.instances.values():
            await asyncio.to_thread(inst.process.stop)
            if inst.socket is not None:
                inst.socket.close()
        if self._inbox is not None:
            self._inbox.close()
        self._error = self._error or "shut down"
        self._fail_all(EngineDeadError("the controller shut down"))

    @property
    def is_healthy(self) -> bool:
        return (self._error is None and self._receiver is not None
                and all(i.process.alive for i in self.instances.values()))

    # ------------------------------------------------------------------ requests
    def check_request(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        return fit_to_context(ids, params, self.max_model_len, self.vocab_size)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> RequestStream:
        if not self.is_healthy:
            raise EngineDeadError(f"the deployment is not running ({self._error or 'an instance died'})")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = self.check_request(ids, params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        tracked = _Tracked(request_id, len(ids), asyncio.Queue(), params)
        self.requests[request_id] = tracked
        role = "prefill" if self.disaggregated else "colocated"
        target = self._least_loaded(role)
        if self.disaggregated:
            target.queued_tokens += len(ids)
            tracked.prefill = target.spec.instance_id
        else:
            target.load += 1
            tracked.decode = target.spec.instance_id
        await target.socket.send(self.sealer.seal(m.AddRequest(request_id, ids, params, time.monotonic())))
        return RequestStream(request_id, tracked.outputs, self._on_stream_closed)

    def _least_loaded(self, role: str) -> _Instance:
        pool = [i for i in self.instances.values() if i.spec.role == role]
        return pool[least_loaded([i.queued_tokens if role == "prefill" else i.load for i in pool])]

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        if not finished:
            asyncio.get_event_loop().create_task(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        tracked = self._forget(request_id)
        if tracked is None:
            return
        for iid in {tracked.prefill, tracked.decode} - {None}:
            await self.instances[iid].socket.send(self.sealer.seal(m.Abort(request_id)))
        tracked.outputs.put_nowait(RequestOutput(request_id, [], "", True, "abort"))

    def _forget(self, request_id: str) -> _Tracked | None:
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return None
        if self.disaggregated and tracked.prefill and not tracked.prefilled:
            self.instances[tracked.prefill].queued_tokens -= tracked.prompt_len
        if tracked.decode:
            self.instances[tracked.decode].load -= 1
        return tracked

    async def _watch(self, interval_s: float = 0.5) -> None:
        """An instance that dies fails the requests it holds at once, instead of leaving
        their clients waiting; the deployment then reports itself unhealthy."""
        while True:
            await asyncio.sleep(interval_s)
            dead = [iid for iid, inst in self.instances.items() if not inst.process.alive]
            if not dead:
                continue
            self._error = f"instance(s) {', '.join(dead)} died"
            log.error("%s", self._error)
            for request_id, tracked in list(self.requests.items()):
                if {tracked.prefill, tracked.decode} & set(dead):
                    self._forget(request_id)
                    tracked.outputs.put_nowait(EngineDeadError(
                        f"request {request_id} was lost: {self._error}"))
            return

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
                await self.instances[done.source].socket.send(self.sealer.seal(m.Release(done.request_id)))
                self.transfer_bytes += done.nbytes
                self.transfer_seconds += done.seconds
                self.num_transfers += 1
                tracked = self.requests.get(done.request_id)
                if tracked is not None:
                    tracked.transfer_bytes += done.nbytes
                    tracked.transfer_seconds += done.seconds
        elif isinstance(msg, m.Stats):
            self.instances[msg.instance_id].stats = msg
        elif isinstance(msg, m.Rejected):
            tracked = self._forget(msg.request_id)
            if tracked is not None:
                tracked.outputs.put_nowait(ValueError(msg.message))
        elif isinstance(msg, m.Failed):
            self._error = f"instance {msg.instance_id} failed: {msg.message}"
            self._fail_all(EngineDeadError(self._error))

    def _deliver(self, instance_id: str, out: RequestOutput) -> None:
        tracked = self.requests.get(out.request_id)
        if tracked is None:
            return  # aborted: its stream is gone
        if instance_id not in (tracked.prefill, tracked.decode):
            self.num_dropped_messages += 1  # only the instances that hold it speak for it
            log.warning("controller dropped an output for %s from %s, which does not hold it",
                        out.request_id, instance_id)
            return
        if self.disaggregated and not tracked.prefilled:
            self.instances[instance_id].queued_tokens -= tracked.prompt_len
            tracked.prefilled = True
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
        target = self._least_loaded("decode")
        target.load += 1
        tracked.decode = target.spec.instance_id
        endpoint = self.instances[source].ready.endpoint
        await target.socket.send(self.sealer.seal(m.AddMigration(ticket, tracked.params, source, endpoint)))

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.requests):
            tracked = self.requests.pop(request_id)
            tracked.outputs.put_nowait(error)

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

    def instance_stats(self) -> list[m.Stats]:
        return [i.stats for i in self.instances.values() if i.stats is not None]
