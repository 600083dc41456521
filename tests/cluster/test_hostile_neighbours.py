"""A disaggregated deployment (real instance processes) outlives what once ended it: stray
frames on its internal ports, messages forged by a process without the deployment's secret
(commands, outputs, aborts), and a tiny temperature."""
from __future__ import annotations

import asyncio

import pytest
import zmq

from distserve import SamplingParams
from distserve.cluster import messages as m
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.config import EngineConfig
from distserve.cluster.local import LocalLauncher
from distserve.controller import Controller
from distserve.server.metrics import ServerMetrics
from distserve.cluster.messages import RequestOutput

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _push(address: str, frames: list[bytes]) -> None:
    """A local stranger that connects to a port and sends what it likes."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    for frame in frames:
        sock.send(frame)
    sock.close()
    ctx.term()


async def _text(controller, rid, params=GREEDY, prompt="Once upon a time"):
    tokens = []
    async for out in await controller.generate(prompt, params, rid):
        tokens += out.new_token_ids
    return tokens


async def _dropped(controller, n, timeout=10.0):
    """Waits until the controller has dropped exactly `n` frames (and no more)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while controller.num_dropped_messages < n and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert controller.num_dropped_messages == n


async def _all_free(controller, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        stats = controller.instance_stats()
        if all(s.num_free_blocks == s.num_blocks and s.num_running == 0 for s in stats):
            return True
        await asyncio.sleep(0.05)
    return False


def test_stray_frames_forged_messages_and_tiny_temperatures_end_nothing(tiny_llama):
    base = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64)
    deployment = Deployment(base, "disaggregated", prefill=PhaseSettings(1),
                            decode=PhaseSettings(2))

    async def run():
        c = Controller(deployment.specs, str(tiny_llama), LocalLauncher())
        await c.start()
        try:
            expected = await _text(c, "before")
            stranger = m.Sealer.new()  # a local process that is not part of the deployment
            garbage = [b"\x00", b"\xc1", b"not msgpack at all", b""]
            _push(c.address, garbage + [stranger.seal(m.Stats("decode-0", "decode", 9, 9, 9,
                                                               0.9, 0, 1))])
            for inst in c.instances.values():  # commands it must neither obey nor die of
                _push(inst.ready.command_address, garbage + [stranger.seal(m.Shutdown())])
            # a signed message naming instances the deployment does not have (a buggy peer)
            _push(c.address, [c.sealer.seal(m.Stats("nobody", "decode", 1, 1, 1, 0.5, 0, 1)),
                              c.sealer.seal(m.Migrated("prefill-0",
                                                       [m.MigrationDone("x", "nobody", 1, 0.1)]))])

            await _dropped(c, len(garbage) + 3)    # garbage, the stranger's, the two unknown
            beat = c.sealer.seal(m.Heartbeat("decode-0"))
            _push(c.address, [beat, beat])            # seen on the wire and sent again
            await _dropped(c, len(garbage) + 4)       # taken once

            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            stream = await c.generate("Once upon a time", long, "victim")
            first = await stream.__anext__()
            while c.requests["victim"].decode is None:
                await asyncio.sleep(0.001)
            holder = c.requests["victim"].decode
            other = ({"decode-0", "decode-1"} - {holder}).pop()
            injected = [RequestOutput("victim", [1], "INJECTED", True, "stop")]
            # a stranger in the holder's name; a signed output from an instance not holding it;
            # a stranger's abort of the victim on its decode instance
            _push(c.address, [stranger.seal(m.Outputs(holder, injected)),
                              c.sealer.seal(m.Outputs(other, injected))])
            _push(c.instances[holder].ready.command_address, [stranger.seal(m.Abort("victim"))])
            rest = [out async for out in stream]
            victim = first.new_token_ids + [t for out in rest for t in out.new_token_ids]
            assert "INJECTED" not in "".join(out.new_text for out in rest)
            assert all(inst.process.alive for inst in c.instances.values())
            assert c.instances["decode-0"].stats.num_waiting != 9  # the stranger's Stats

            tiny = [await _text(c, f"tiny-{i}", SamplingParams(
                temperature=t, max_tokens=12, ignore_eos=True, seed=i))
                for i, t in enumerate((1e-40, 5e-324))]
            after = await _text(c, "after")
            assert c.is_healthy
            assert await _all_free(c), c.instance_stats()
            metrics = ServerMetrics("tiny").render(c.stats(), c.instance_stats(),
                                                   c.counts()).decode()
            return expected, victim, tiny, after, c.num_dropped_messages, metrics
        finally:
            await c.shutdown()

    expected, victim, tiny, after, dropped, metrics = asyncio.run(asyncio.wait_for(run(), 120))
    assert f'distserve:internal_messages_dropped{{model_name="tiny"}} {float(dropped)}' in metrics
    assert len(victim) == 200 and victim[:12] == expected and after == expected
    assert tiny == [expected, expected]  # below the greedy threshold: the greedy tokens
    # 4 frames of garbage, the stranger's Stats and Outputs, the 2 signed messages naming
    # unknown instances, the replayed heartbeat; the signed output of the non-holder too,
    # unless it came after the victim had finished (then there is nobody to deliver it to)
    assert dropped in (9, 10)
