"""The controller's dispatch, hand-over and abort, against fake instances that speak the
real message protocol over real ZeroMQ sockets (started through the launcher seam)."""
from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
import zmq

from distserve.cluster import messages as m
from distserve.cluster.launcher import InstanceSpec
from distserve.config import EngineConfig
from distserve.controller import Controller
from distserve.request import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=4)


class FakeInstance(threading.Thread):
    """Says Ready, records every command it gets, sends what the test queues."""

    def __init__(self, spec: InstanceSpec, controller: str, secret: bytes) -> None:
        super().__init__(daemon=True)
        self.spec, self.controller = spec, controller
        self.sealer = m.Sealer(secret)
        self.received: list = []
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.address = ""
        self._bound = threading.Event()
        self._dead = threading.Event()
        self.start()
        self._bound.wait(5)

    def run(self) -> None:
        ctx = zmq.Context()
        out, commands = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        out.connect(self.controller)
        self.address = f"tcp://127.0.0.1:{commands.bind_to_random_port('tcp://127.0.0.1')}"
        self._bound.set()
        endpoint = {"backend": "tcp", "num_blocks": 8, "num_layers": 1, "block_size": 16,
                    "num_kv_heads": 1, "head_dim": 8, "dtype": "float32",
                    "host": "127.0.0.1", "port": 1}
        out.send(self.sealer.seal(m.Ready(self.spec.instance_id, self.spec.role, self.address, 64, 16,
                                  512, 1000, endpoint if self.spec.role == "prefill" else None)))
        beat = 0.0
        while not self._dead.is_set():
            if time.monotonic() - beat > m.HEARTBEAT_S:   # alive, as the protocol says
                out.send(self.sealer.seal(m.Heartbeat(self.spec.instance_id)))
                beat = time.monotonic()
            while not self.outbox.empty():
                out.send(self.sealer.seal(self.outbox.get()))
            if commands.poll(10):
                cmd = self.sealer.open_for_instance(commands.recv())
                self.received.append(cmd)
                if isinstance(cmd, m.Shutdown):
                    break
        out.close(linger=1000)
        commands.close()
        ctx.term()

    def send(self, msg) -> None:
        self.outbox.put(msg)

    def die(self) -> None:
        """Ends like a killed process: no goodbye, its sockets just go."""
        self._dead.set()
        self.join(5)

    def got(self, kind) -> list:
        return [c for c in self.received if isinstance(c, kind)]

    @property
    def alive(self) -> bool:
        return self.is_alive()

    def output_tail(self, chars: int = 2000) -> str:
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        self.join(timeout)


class FakeLauncher:
    def __init__(self) -> None:
        self.started: dict[str, FakeInstance] = {}

    def start(self, spec, controller, transfer, secret):
        self.started[spec.instance_id] = FakeInstance(spec, controller, secret)
        return self.started[spec.instance_id]


def _specs(**counts) -> list[InstanceSpec]:
    return [InstanceSpec(role, f"{role}-{i}", EngineConfig())
            for role, n in counts.items() for i in range(n)]


async def _until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the fake instances")
        await asyncio.sleep(0.005)


def _ticket(rid: str, prompt: list[int]) -> m.MigrationTicket:
    return m.MigrationTicket(rid, prompt, 5, "x", None, [0], 0.0, 0.0)


def _run(tiny_llama, specs, body, **kwargs):
    launcher = FakeLauncher()

    async def main():
        c = Controller(specs, str(tiny_llama), launcher, **kwargs)
        await c.start()
        try:
            return await body(c, launcher.started)
        finally:
            await c.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_prompts_go_to_the_prefill_instance_with_the_fewest_queued_tokens(tiny_llama):
    async def body(c, fakes):
        streams = []   # held: a dropped stream aborts its request
        for rid, n in (("long", 300), ("a", 10), ("b", 10), ("c", 10)):
            streams.append(await c.generate(list(range(1, n + 1)), PARAMS, rid))
        p0, p1 = fakes["prefill-0"], fakes["prefill-1"]
        await _until(lambda: len(p0.got(m.AddRequest)) + len(p1.got(m.AddRequest)) == 4)
        return ([a.request_id for a in p0.got(m.AddRequest)],
                [a.request_id for a in p1.got(m.AddRequest)])

    first, second = _run(tiny_llama, _specs(prefill=2, decode=1), body)
    assert first == ["long"] and second == ["a", "b", "c"]


def test_first_token_then_migration_to_the_least_loaded_decode_then_release(tiny_llama):
    async def body(c, fakes):
        p, d0, d1 = fakes["prefill-0"], fakes["decode-0"], fakes["decode-1"]
        streams = [await c.generate([1, 2, 3], PARAMS, rid) for rid in ("r0", "r1")]
        for rid in ("r0", "r1"):
            p.send(m.Outputs("prefill-0", [m.RequestOutput(rid, [5], "x", False)]))
            p.send(m.Tickets("prefill-0", [_ticket(rid, [1, 2, 3])]))
        await _until(lambda: len(d0.got(m.AddMigration)) + len(d1.got(m.AddMigration)) == 2)
        holder = {a.ticket.request_id: f for f in (d0, d1) for a in f.got(m.AddMigration)}
        assert holder["r0"] is not holder["r1"]  # the second went to the idle one
        holder["r0"].send(m.Migrated(holder["r0"].spec.instance_id,
                                     [m.MigrationDone("r0", "prefill-0", 64, 0.01)]))
        await _until(lambda: p.got(m.Release))
        sender = holder["r0"].spec.instance_id
        holder["r0"].send(m.Outputs(sender, [m.RequestOutput("r0", [6], "y", True, "length")]))
        texts = [o.new_text async for o in streams[0]]
        await streams[1].aclose()
        await _until(lambda: p.got(m.Abort) and holder["r1"].got(m.Abort))
        return texts, [r.request_id for r in p.got(m.Release)], c.transfer_bytes

    texts, released, moved = _run(tiny_llama, _specs(prefill=1, decode=2), body)
    assert texts == ["x", "y"] and released == ["r0"] and moved == 64


def test_a_rejected_request_ends_its_stream_with_the_instances_reason(tiny_llama):
    async def body(c, fakes):
        stream = await c.generate([1, 2], PARAMS, "bad")
        fakes["colocated-0"].send(m.Rejected("colocated-0", "bad", "no room for you"))
        with pytest.raises(ValueError, match="no room for you"):
            async for _ in stream:
                pass
        return c.requests

    assert _run(tiny_llama, _specs(colocated=1), body) == {}


def test_colocated_requests_go_to_the_instance_with_the_fewest_requests(tiny_llama):
    async def body(c, fakes):
        streams = [await c.generate([1, 2], PARAMS, f"r{i}") for i in range(4)]  # held
        f0, f1 = fakes["colocated-0"], fakes["colocated-1"]
        await _until(lambda: len(f0.got(m.AddRequest)) + len(f1.got(m.AddRequest)) == 4)
        return len(f0.got(m.AddRequest)), len(f1.got(m.AddRequest)), len(streams)

    assert _run(tiny_llama, _specs(colocated=2), body) == (2, 2, 4)


def test_kv_never_pulled_is_taken_back_after_its_lease_and_the_request_runs_again(tiny_llama):
    """A decode instance that takes a migration and never pulls (alive, heartbeats and all):
    after the lease the controller aborts it there, releases the prefill side's blocks and
    sends the prompt with the streamed token to a prefill instance again."""
    async def body(c, fakes):
        p, d = fakes["prefill-0"], fakes["decode-0"]
        stream = await c.generate([1, 2, 3], PARAMS, "r0")
        p.send(m.Outputs("prefill-0", [m.RequestOutput("r0", [5], "x", False)]))
        p.send(m.Tickets("prefill-0", [_ticket("r0", [1, 2, 3])]))
        await _until(lambda: d.got(m.AddMigration))
        await _until(lambda: len(p.got(m.AddRequest)) == 2, timeout=5)
        assert [a.request_id for a in d.got(m.Abort)] == ["r0"]
        assert [r.request_id for r in p.got(m.Release)] == ["r0"]
        again = p.got(m.AddRequest)[1]
        await stream.aclose()
        return (again.prompt_token_ids, again.params.max_tokens, again.resume,
                c.counts()["requests_rerun"])

    prompt, max_tokens, resume, reruns = _run(tiny_llama, _specs(prefill=1, decode=1), body,
                                              kv_lease_s=0.5)
    assert prompt == [1, 2, 3, 5] and max_tokens == PARAMS.max_tokens - 1 and reruns == 1
    assert resume == m.Resume(1, 1)   # token 5 was an output, its text "x" was sent


def test_a_failed_pull_is_computed_on_the_decode_instance_or_run_again(tiny_llama):
    """PullFailed(recomputed): the decode instance computes the prompt itself, so the prefill
    side's blocks are released and the request stays; without it, the request runs again
    through the prefill instance (the prompt with the token already streamed)."""
    async def body(c, fakes):
        p, d = fakes["prefill-0"], fakes["decode-0"]
        streams = [await c.generate([1, 2, 3], PARAMS, rid) for rid in ("here", "again")]
        for rid in ("here", "again"):
            p.send(m.Outputs("prefill-0", [m.RequestOutput(rid, [5], "x", False)]))
            p.send(m.Tickets("prefill-0", [_ticket(rid, [1, 2, 3])]))
        await _until(lambda: len(d.got(m.AddMigration)) == 2)
        d.send(m.PullFailed("decode-0", "here", "checksum mismatch", recomputed=True))
        d.send(m.PullFailed("decode-0", "again", "source gone"))
        await _until(lambda: len(p.got(m.AddRequest)) == 3 and len(p.got(m.Release)) == 2)
        d.send(m.Outputs("decode-0", [m.RequestOutput("here", [6], "y", True, "length")]))
        texts = [o.new_text async for o in streams[0]]
        rerun = p.got(m.AddRequest)[2]
        await streams[1].aclose()
        return (texts, [r.request_id for r in p.got(m.Release)], rerun.request_id,
                rerun.prompt_token_ids, c.counts())

    texts, released, rerun_id, prompt, counts = _run(tiny_llama, _specs(prefill=1, decode=1), body)
    assert texts == ["x", "y"] and sorted(released) == ["again", "here"]   # both holds freed
    assert rerun_id.startswith("again") and prompt == [1, 2, 3, 5]
    assert counts["kv_pulls_recomputed"] == 1 and counts["requests_rerun"] == 1


def test_a_request_whose_every_token_was_out_finishes_when_its_instance_dies(tiny_llama):
    """Its instance died after streaming all of max_tokens but before the finish: nothing is
    run again; the stream ends with the finish, its counts those of the whole request."""
    async def body(c, fakes):
        stream = await c.generate([1, 2, 3], PARAMS, "r0")
        await _until(lambda: any(f.got(m.AddRequest) for f in fakes.values()))
        holder = next(f for f in fakes.values() if f.got(m.AddRequest))
        iid = holder.spec.instance_id
        holder.send(m.Outputs(iid, [m.RequestOutput("r0", [7, 8, 9, 10], "abcd", False,
                                                     num_prompt_tokens=3, num_output_tokens=4)]))
        outs = [await stream.__anext__()]
        holder.die()
        outs += [o async for o in stream]
        others = [f for f in fakes.values() if f is not holder]
        return outs, sum(len(f.got(m.AddRequest)) for f in others), c.counts()

    outs, resent, counts = _run(tiny_llama, _specs(colocated=2), body)
    assert [o.new_token_ids for o in outs] == [[7, 8, 9, 10], []]
    last = outs[-1]
    assert last.finished and last.finish_reason == "length"
    assert (last.num_prompt_tokens, last.num_output_tokens) == (3, 4)
    assert resent == 0 and counts["instance_failures"] == 1 and counts["requests_rerun"] == 0
