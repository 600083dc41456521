"""An instance process: one engine (prefill, decode or colocated) behind the control channel.

Started as `python -m distserve.cluster.instance --role ROLE ...` by a launcher. It connects
a PUSH socket to the controller, binds a PULL socket for commands, says Ready, then loops:
apply commands -> step -> send outputs. It sleeps on the socket when idle and exits when
told to, or when its controller is gone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import threading
import time

import msgspec
import torch
import zmq

from distserve.cluster import messages as m
from distserve.cluster.step_samples import StepSampler
from distserve.cluster.step_trace import StepTrace
from distserve.config import EngineConfig
from distserve.engine.engine import Engine, Migration
from distserve.engine.executor import load_executor
from distserve.transfer import InstanceEndpoint, make_puller, make_source
from distserve.transfer.shares import KVLink

log = logging.getLogger("distserve.instance")
ROLES = ("prefill", "decode", "colocated")
_STATS_INTERVAL_S = 0.05
_SEND_TIMEOUT_MS = 10_000


class ControllerGone(Exception):
    """The controller stopped taking messages (it died or was killed): the instance exits."""


class InstanceLoop:
    def __init__(self, role: str, instance_id: str, config: EngineConfig, controller: str,
                 transfer: str, sealer: m.Sealer, host: str = "127.0.0.1",
                 switchable: bool = False) -> None:
        if switchable and (role == "colocated" or config.num_workers > 1):
            raise ValueError("only a one-worker prefill or decode instance can switch roles")
        self.role, self.instance_id, self.config = role, instance_id, config
        self.switchable = switchable
        self.sealer = sealer
        self.ctx = zmq.Context()
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)   # never blocked for good on a send
        self.out.connect(controller)
        self.commands = self.ctx.socket(zmq.PULL)
        port = self.commands.bind_to_random_port(f"tcp://{host}")
        self.command_address = f"tcp://{host}:{port}"
        self.engine, self.sources, kv_endpoint, self.puller = self._build_engine(
            role, config, transfer, host)
        executor = self.engine.executor
        self.trace = StepTrace.from_env(instance_id)
        hook = self.trace.step if self.trace is not None else None
        # under --adapt the controller weighs the steps' speed against the plan's profile
        self.sampler = StepSampler(hook) if switchable else None
        if self.sampler is not None or hook is not None:
            executor.on_step = self.sampler.on_step if self.sampler is not None else hook
        self.endpoints: dict[str, InstanceEndpoint] = {}
        self.transfer_bytes, self.transfer_seconds, self.num_transfers = 0, 0.0, 0
        self._last_stats = 0.0
        self.num_dropped_messages = 0
        self._iteration_started = 0.0   # monotonic start of the engine iteration, 0 between
        self._stopping = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(controller,), daemon=True,
                                           name="heartbeat")
        self._heartbeat.start()
        self._send(m.Ready(instance_id, role, self.command_address, executor.num_kv_blocks,
                           config.block_size, executor.max_model_len, executor.vocab_size,
                           msgspec.to_builtins(kv_endpoint) if kv_endpoint else None,
                           self.sealer.nonce))

    def _build_engine(self, role: str, config: EngineConfig, transfer: str, host: str):
        """(engine, KV sources to close, this instance's KV endpoint, KV puller): a prefill
        instance's cache lives where decode instances can pull from it (every worker's share
        for TP x PP, each exported by its worker); a decode instance pulls."""
        secret = self.sealer.secret
        if self.switchable:   # both roles' parts: an exported cache, a puller
            return self._build_switchable(role, config, transfer, host)
        if role == "prefill":
            if config.num_workers > 1:
                executor = load_executor(config, pin_cores=True,
                                         kv_link=KVLink(transfer, secret, host, export=True))
                return (Engine(config, executor, role), [],
                        InstanceEndpoint(executor.kv_endpoints), None)
            executor, sources, endpoint = self._load_exported(config, transfer, host)
            return Engine(config, executor, role), sources, endpoint, None
        if role == "decode":
            executor = load_executor(config, pin_cores=True,
                                     kv_link=KVLink(transfer, secret, host, export=False))
            return (Engine(config, executor, role, self._pull), [], None,
                    make_puller(transfer, secret=secret))
        return Engine(config, load_executor(config, pin_cores=True), role), [], None, None

    def _build_switchable(self, role: str, config: EngineConfig, transfer: str, host: str):
        """An instance that may change roles later keeps what both need from the start: its
        cache where decode instances can pull from it, and a puller of its own."""
        executor, sources, self._export = self._load_exported(config, transfer, host)
        engine = Engine(config, executor, role, self._pull if role == "decode" else None)
        return (engine, sources, self._export if role == "prefill" else None,
                make_puller(transfer, secret=self.sealer.secret))

    def _load_exported(self, config: EngineConfig, transfer: str, host: str):
        """(executor, KV sources, endpoint) of a one-worker instance whose cache is allocated
        where decode instances can pull from it."""
        sources = []

        def allocate(shape, num_blocks, dtype, device):
            cache, source = make_source(transfer, shape, num_blocks, dtype, device,
                                        host=host, secret=self.sealer.secret)
            sources.append(source)
            return cache
        executor = load_executor(config, allocate, pin_cores=True)
        return executor, sources, InstanceEndpoint([src.endpoint for src in sources])

    def switch_role(self, role: str) -> m.RoleSwitched:
        """A new engine of `role` over the same executor (the model and the cache stay); only
        when no request is here, so no block is held and none is lost."""
        e = self.engine
        why = ("this instance was not started switchable" if not self.switchable else
               f"unknown role {role!r}" if role not in ("prefill", "decode") else
               f"{len(e.requests) + len(e.held)} request(s) still here" if e.has_unfinished
               or e.requests or e.held or e.migrations else "")
        if why:
            return m.RoleSwitched(self.instance_id, self.role, None, why)
        # the step trace hook is the executor's: it stays
        self.engine = Engine(self.config, e.executor, role, self._pull if role == "decode" else None)
        self.role = role
        log.warning("%s: now a %s instance", self.instance_id, role)
        endpoint = msgspec.to_builtins(self._export) if role == "prefill" else None
        return m.RoleSwitched(self.instance_id, role, endpoint)

    def _send(self, msg) -> None:
        try:
            self.out.send(self.sealer.seal(msg))
        except zmq.Again:
            raise ControllerGone(f"no message taken for {_SEND_TIMEOUT_MS / 1000:g} s") from None

    def _beat(self, controller: str) -> None:
        """Heartbeats on a socket of their own (a ZeroMQ socket is one thread's), through long
        model steps too: torch releases the GIL while it computes."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 8)   # a controller that is gone does not pile them up
        sock.connect(controller)
        try:
            while not self._stopping.wait(m.HEARTBEAT_S):
                started = self._iteration_started
                busy = time.monotonic() - started if started else 0.0
                try:
                    sock.send(self.sealer.seal(m.Heartbeat(self.instance_id, busy)), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            sock.close()

    def _pull(self, source: str, src_blocks: list[int], dst_blocks: list[int]) -> tuple[int, float]:
        stats = self.engine.executor.pull_kv(self.puller, self.endpoints[source], src_blocks,
                                             dst_blocks)
        self.transfer_bytes += stats.nbytes
        self.transfer_seconds += stats.seconds
        self.num_transfers += 1
        return stats.nbytes, stats.seconds

    def run(self, parent: int) -> None:
        """Until told to stop, or until `parent` (the launcher's process, as recorded at this
        process's start) is gone."""
        while True:
            busy = self.engine.has_unfinished
            if os.getppid() != parent:   # busy or not: nobody will read what it computes
                log.warning("%s: controller gone, exiting", self.instance_id)
                return
            self.commands.poll(0 if busy else 500)
            if not self._apply_commands():
                return
            if self.engine.has_unfinished:
                self._iteration_started = time.monotonic()
                self._step()
                self._iteration_started = 0.0
            # while busy a few times a second; the moment it goes idle, the final state
            self._maybe_send_stats(force=busy and not self.engine.has_unfinished)

    def _apply_commands(self) -> bool:
        while True:
            try:
                data = self.commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                cmd = self.sealer.open_for_instance(data)
            except m.BadFrame as e:
                # a stranger's packet on the command port is neither obeyed nor fatal
                self.num_dropped_messages += 1
                log.warning("%s: dropped a command: %s", self.instance_id, e)
                continue
            if isinstance(cmd, m.Shutdown):
                return False
            self._apply(cmd)
            self._maybe_send_stats(force=not self.engine.has_unfinished)

    def _apply(self, cmd) -> None:
        e = self.engine
        if isinstance(cmd, (m.AddRequest, m.AddMigration)):
            try:
                if isinstance(cmd, m.AddRequest):
                    if self.trace is not None:
                        self.trace.received(cmd.request_id, cmd.arrival_time,
                                            len(cmd.prompt_token_ids))
                    e.add(cmd.prompt_token_ids, cmd.params, cmd.request_id, cmd.arrival_time,
                          resume=cmd.resume)
                else:
                    t = cmd.ticket
                    # a restarted prefill instance comes back with another endpoint
                    self.endpoints[cmd.source] = msgspec.convert(cmd.endpoint, InstanceEndpoint)
                    e.add(t.prompt_token_ids, cmd.params, t.request_id, t.arrival_time,
                          Migration(t, cmd.source))
            except (ValueError, msgspec.ValidationError) as err:
                rid = cmd.request_id if isinstance(cmd, m.AddRequest) else cmd.ticket.request_id
                self._send(m.Rejected(self.instance_id, rid, str(err)))
        elif isinstance(cmd, m.SwitchRole):
            self._send(self.switch_role(cmd.role))
        elif isinstance(cmd, m.Release):
            e.release(cmd.request_id)
        elif isinstance(cmd, m.Abort):
            out = e.abort(cmd.request_id)
            if out is not None:
                self._send(m.Outputs(self.instance_id, [out]))

    def _step(self) -> None:
        step = self.engine.step()
        if step.kv_pulled:
            self._send(m.Migrated(self.instance_id, step.kv_pulled))
        for request_id, reason in step.kv_failed:
            self._send(m.PullFailed(self.instance_id, request_id, reason))
        for request_id, reason in step.kv_recomputed:
            self._send(m.PullFailed(self.instance_id, request_id, reason, recomputed=True))
        if step.outputs:
            self._send(m.Outputs(self.instance_id, step.outputs))
            if self.trace is not None and self.role == "prefill":
                self.trace.sent([o.request_id for o in step.outputs])
        if step.kv_ready:
            self._send(m.Tickets(self.instance_id, step.kv_ready))

    def _maybe_send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < _STATS_INTERVAL_S:
            return
        self._last_stats = now
        s = self.engine.stats()
        self._send(m.Stats(self.instance_id, self.role, s.num_running, s.num_waiting,
                           s.queued_tokens, s.kv_usage, s.num_free_blocks, s.num_blocks,
                           self.transfer_bytes, self.transfer_seconds, self.num_transfers,
                           s.prefill_seconds_per_token,
                           self.sampler.take(now) if self.sampler is not None else []))

    def close(self) -> None:
        self._stopping.set()
        self._heartbeat.join(2)
        try:
            self.out.setsockopt(zmq.SNDTIMEO, 500)
            self._maybe_send_stats(force=True)
        except ControllerGone:
            pass
        for closable in (*self.sources, self.puller, self.trace):
            if closable is not None:
                closable.close()
        self.engine.executor.close()
        self.out.close()
        self.commands.close()
        self.ctx.term()


def _exit_if_orphaned_while_loading(parent: int, loaded: threading.Event, instance_id: str) -> None:
    """A launcher stopped while the model loads (minutes on a busy machine) would leave this
    process to finish loading and then idle for good, with its memory and shared KV segment:
    leave as soon as the parent is gone. (Once loaded, the run loop watches instead.)"""
    while not loaded.wait(0.5):
        if os.getppid() != parent:
            log.warning("%s: launcher gone while loading, exiting", instance_id)
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one distserve instance process")
    ap.add_argument("--role", choices=ROLES, required=True)
    ap.add_argument("--instance-id", required=True)
    ap.add_argument("--controller", required=True, help="tcp://host:port of the controller")
    ap.add_argument("--config-json", required=True, help="EngineConfig fields as JSON")
    ap.add_argument("--transfer", default="shm", choices=["shm", "tcp", "cuda_ipc"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--switchable", action="store_true", help="keep what both the prefill and "
                    "the decode role need, to switch between them in place (serve --adapt)")
    args = ap.parse_args(argv)
    parent = os.getppid()   # now: once the parent is gone, this process is already someone else's
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.instance_id} %(levelname)s: %(message)s")
    loaded = threading.Event()
    threading.Thread(target=_exit_if_orphaned_while_loading, args=(parent, loaded, args.instance_id),
                     daemon=True, name="orphan-watch").start()
    config = EngineConfig(**json.loads(args.config_json))
    secret = os.environ.pop(m.SECRET_ENV, "")
    if not secret:
        ap.error(f"${m.SECRET_ENV} (the deployment's secret, set by the launcher) is not set")
    sealer = m.Sealer(bytes.fromhex(secret), nonce=secrets.token_bytes(16))  # this incarnation
    try:
        loop = InstanceLoop(args.role, args.instance_id, config, args.controller, args.transfer,
                            sealer, args.host, args.switchable)
    except Exception as err:  # tell the controller why, then fail
        ctx = zmq.Context()
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(args.controller)
        s.send(sealer.seal(m.Failed(args.instance_id, f"{type(err).__name__}: {err}")))
        s.close()
        ctx.term()
        raise
    loaded.set()
    try:
        with torch.inference_mode():
            loop.run(parent)
    except ControllerGone as e:
        log.warning("%s: controller gone (%s), exiting", args.instance_id, e)
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
