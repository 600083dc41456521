"""The controller's side of its instances' lives: it waits for them to say Ready (at start
and after a restart), finds the ones that died or went silent (no heartbeat), runs the
requests they held again on the others (recovery.Progress: the stream continues where it
was), and starts them again after their back-off (supervision.Supervisor). A part of distserve.controller.Controller, kept apart so the
dispatch path stays short; it uses the controller's instances, requests, supervisor,
launcher and dispatch. Imports no torch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import zmq

from distserve.cluster import messages as m
from distserve.cluster.messages import RequestOutput
from distserve.engine.async_engine import EngineDeadError

log = logging.getLogger("distserve.controller")
MAX_RERUNS = 2   # a request is run again at most this often (a poison request must not
#                  take every instance down in turn)
if TYPE_CHECKING:
    from distserve.controller import _Tracked


class Failover:
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
                self._attach(msg)
                pending.discard(msg.instance_id)

    def _attach(self, msg: m.Ready) -> None:
        """An instance said Ready (first start or restart): commands go to its new port."""
        inst = self.instances[msg.instance_id]
        if inst.socket is not None:
            inst.socket.close(linger=0)
        inst.ready = msg
        inst.stats = m.Stats(msg.instance_id, msg.role, 0, 0, 0, 0.0,
                             msg.num_kv_blocks, msg.num_kv_blocks)
        inst.load = inst.queued_tokens = 0
        inst.socket = self._ctx.socket(zmq.PUSH)
        inst.socket.setsockopt(zmq.LINGER, 1000)
        inst.socket.connect(msg.command_address)
        self.supervisor.ready(msg.instance_id, time.monotonic())

    async def _watch(self, interval_s: float = 0.25) -> None:
        """Finds instances that died or went silent, runs their requests again elsewhere and
        starts them again when their back-off is over. A round that fails is logged and the
        next one runs: supervision never ends while the controller runs (a dead watch loop
        would leave a lost instance down for good)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            stalled, last = now - last > 4 * interval_s, now
            if stalled:   # this loop was held up: the heartbeats queued meanwhile are not late
                continue
            try:
                await self._supervise(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("a round of instance supervision failed; the next one follows")

    async def _supervise(self, now: float) -> None:
        sup = self.supervisor
        for iid, inst in self.instances.items():
            if sup.is_up(iid) and not inst.process.alive:
                await self._lose(iid, f"instance {iid} exited")
            elif sup.is_starting(iid) and not inst.process.alive:
                sup.down(iid, now, f"instance {iid} exited while restarting")
        for iid in sup.silent(now):
            await self._lose(iid, f"instance {iid} sent no heartbeat for {sup.heartbeat_timeout_s:g} s")
        for iid in sup.late_starts(now):
            self.instances[iid].process.stop(0.0)
            sup.down(iid, now, f"instance {iid} was not ready in time after a restart")
        for iid in sup.restarts_due(now):
            self._restart(iid, now)
        for tracked in [t for t in self.requests.values() if t.ticket_at and not t.migrated
                        and now - t.ticket_at > self.kv_lease_s]:
            await self._rerun(tracked, f"its KV was not pulled within {self.kv_lease_s:g} s")

    async def _lose(self, iid: str, why: str) -> None:
        log.error("%s; its requests run again on the other instances", why)
        inst = self.instances[iid]
        self.supervisor.down(iid, time.monotonic(), why)
        try:
            await asyncio.to_thread(inst.process.stop, 0.0)   # a hung one is killed
        except Exception as e:   # it may linger; its restart is still due, its requests rerun
            log.error("instance %s could not be stopped: %s", iid, e)
        for tracked in list(self.requests.values()):
            lost_kv = tracked.prefill == iid and not tracked.migrated
            if tracked.decode == iid or lost_kv:
                await self._rerun(tracked, why)

    def _restart(self, iid: str, now: float) -> None:
        inst = self.instances[iid]
        log.warning("restarting instance %s (%s)", iid, self.supervisor.members[iid].last_error)
        try:
            inst.process = self.launcher.start(inst.spec, self.address, self.transfer, self.sealer.secret)
        except Exception as e:  # the launcher could not: counts as one more failure
            self.supervisor.down(iid, now, f"restart failed: {e}")
            return
        self.supervisor.restarting(iid, now)

    async def _rerun(self, tracked: _Tracked, why: str) -> None:
        """The request continues on other instances; it ends with an error only when no
        instance of the role it needs is up."""
        rid = tracked.request_id
        for iid in {tracked.prefill, tracked.decode} - {None}:   # free what the living hold
            if self.supervisor.is_up(iid):
                await self._send(iid, m.Release(rid) if iid == tracked.prefill else m.Abort(rid))
        self._unassign(tracked)
        tracked.former |= {tracked.prefill, tracked.decode} - {None}
        tracked.prefill = tracked.decode = None
        tracked.prefilled = tracked.migrated = False
        tracked.ticket_at = None
        if tracked.progress.reruns >= MAX_RERUNS:   # a request that fails every instance it meets
            self.requests.pop(rid, None)
            tracked.outputs.put_nowait(EngineDeadError(
                f"request {rid} was lost: {why}; it already ran {MAX_RERUNS + 1} times"))
            return
        again = tracked.progress.continuation(tracked.params)
        lacking = [r for r in (("prefill", "decode") if self.disaggregated else ("colocated",))
                   if self._least_loaded(r) is None]
        if again is None:   # every token was out; only the finish was lost with the instance
            self.requests.pop(rid, None)
            p = tracked.progress
            tracked.outputs.put_nowait(RequestOutput(
                rid, [], "", True, "length", num_prompt_tokens=len(p.prompt_ids),
                num_output_tokens=len(p.generated), arrival_time=p.arrival_time,
                first_token_time=p.first_token_time, finish_time=time.monotonic()))
            return
        if lacking or len(again[0]) >= self.max_model_len:
            self.requests.pop(rid, None)
            reason = f"no {' or '.join(lacking)} instance is up" if lacking else "it has no room left"
            tracked.outputs.put_nowait(EngineDeadError(f"request {rid} was lost: {why}; {reason}"))
            return
        self.num_reruns += 1
        await self._dispatch(tracked, *again)
