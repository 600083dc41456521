"""Instances that die or hang mid-stream, for real (kill -9, SIGSTOP of instance processes):
their requests continue on the other instances with the same tokens as without the fault
(greedy, and seeded sampling: each token is drawn from the seed and its position), no block leaks on the survivors, the dead instance is started again and serves, and
/health and the counts say what happened."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from distserve import LLM, SamplingParams
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.cluster.local import LocalLauncher
from distserve.config import EngineConfig
from distserve.controller import Controller

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, my name is", "The river that runs through the city", "x", "Once upon a time"]
LONG = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=3, max_tokens=160, ignore_eos=True)
PARAMS = [LONG, SEEDED, LONG, SEEDED]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    out = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=128).generate(PROMPTS, PARAMS)
    return [r.token_ids for r in out], [r.text for r in out]


def _controller(model, mode, transfer="shm", tp=None, **phases):
    base = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=128)
    dep = Deployment(base, mode, transfer=transfer, pin_cpus=False,
                     **{k: PhaseSettings(v, num_threads=1, tensor_parallel_size=tp)
                        for k, v in phases.items()})
    return Controller(dep.specs, str(model), LocalLauncher())


async def _serve_all(c, victim=None, after_tokens=0, sig=signal.SIGKILL, before=False):
    """Runs PROMPTS at once; `victim` gets `sig` before they are sent or once the first
    stream has `after_tokens` tokens; "colocated-1/worker" is that instance's worker of rank 1.
    (tokens, text, last output) per prompt."""
    pid = None
    if victim:
        instance, _, worker = victim.partition("/")
        pid = c.instances[instance].process.proc.pid
        if worker:
            (pid,) = [kid for kid in _children(pid)
                      if b"distserve.engine.parallel" in open(f"/proc/{kid}/cmdline", "rb").read()]
    if before:
        os.kill(pid, sig)
    seen = asyncio.Event()

    async def collect(i, prompt):
        toks, text, last = [], "", None
        async for out in await c.generate(prompt, PARAMS[i], f"r{i}"):
            toks += out.new_token_ids
            text += out.new_text
            last = out
            if i == 0 and len(toks) >= after_tokens:
                seen.set()
        return toks, text, last

    tasks = [asyncio.create_task(collect(i, p)) for i, p in enumerate(PROMPTS)]
    if victim and not before:
        await seen.wait()
        os.kill(pid, sig)
    return await asyncio.gather(*tasks)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (an instance's parallel workers)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            kids.append(int(entry))
    return kids


async def _until(predicate, timeout):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _no_leaks(c):
    await _until(lambda: all(s.num_free_blocks == s.num_blocks for s in c.instance_stats()), 15)


def _check(results, reference):
    tokens, texts = reference
    assert [r[0] for r in results] == tokens
    assert [r[1] for r in results] == texts
    assert all(r[2].finished and r[2].num_output_tokens == LONG.max_tokens for r in results)
    assert all(r[2].num_prompt_tokens < 40 for r in results)   # the original prompt, not + tokens


@pytest.mark.parametrize("victim,mode,phases,transfer,tp", [
    ("decode-0", "disaggregated", {"prefill": 1, "decode": 2}, "shm", None),
    ("colocated-1", "colocated", {"colocated": 2}, "shm", None),
    # one worker of a tensor-parallel instance dies: the instance ends with it and restarts
    ("colocated-1/worker", "colocated", {"colocated": 2}, "shm", 2),
])
def test_a_killed_instance_loses_nothing_and_comes_back(tiny_llama, reference, victim, mode,
                                                        phases, transfer, tp):
    async def run():
        c = _controller(tiny_llama, mode, transfer, tp, **phases)
        await c.start()
        try:
            results = await _serve_all(c, victim, after_tokens=8)
            _check(results, reference)
            assert c.counts()["instance_failures"] == 1 and c.counts()["requests_rerun"] >= 1
            assert c.health()["status"] in ("degraded", "ok") and c.is_healthy
            await _until(lambda: c.health()["status"] == "ok", 60)   # restarted, rejoined
            assert c.counts()["instance_restarts"] == 1
            again = await _serve_all(c)                               # and it serves
            _check(again, reference)
            await _no_leaks(c)
        finally:
            await c.shutdown()

    asyncio.run(asyncio.wait_for(run(), 240))


def test_a_hung_prefill_instance_is_found_by_its_silence(tiny_llama, reference):
    """SIGSTOP: the process lives but sends no heartbeat; its queued prompts run on the
    other prefill instance, and the hung one is killed and started again."""
    async def run():
        c = _controller(tiny_llama, "disaggregated", "tcp", prefill=2, decode=1)
        await c.start()
        try:
            results = await _serve_all(c, "prefill-0", sig=signal.SIGSTOP, before=True)
            _check(results, reference)
            assert c.counts()["instance_failures"] == 1
            assert c.counts()["requests_rerun"] >= 1        # the first prompt was sent to it
            await _until(lambda: c.health()["status"] == "ok", 60)
            _check(await _serve_all(c), reference)
            await _no_leaks(c)
        finally:
            await c.shutdown()

    asyncio.run(asyncio.wait_for(run(), 240))


def test_a_killed_prefill_instance_spares_what_decode_already_holds(tiny_llama, reference):
    """The prefill instance dies while its requests are decoding elsewhere: they continue
    there untouched (no re-run), and the deployment serves on."""
    async def run():
        c = _controller(tiny_llama, "disaggregated", "shm", prefill=2, decode=1)
        await c.start()
        try:
            results = await _serve_all(c, "prefill-0", after_tokens=20)
            _check(results, reference)
            assert c.counts()["instance_failures"] == 1 and c.counts()["requests_rerun"] == 0
            await _no_leaks(c)
        finally:
            await c.shutdown()

    asyncio.run(asyncio.wait_for(run(), 240))


def test_health_and_metrics_tell_a_client_what_happened(tiny_llama, reference):
    """Over HTTP (the real app, in this event loop): 503 with Retry-After while the only
    decode instance is down, 200 "ok" once it is back, and /metrics counts both."""
    import httpx

    from distserve.server.app import build_app

    async def run():
        c = _controller(tiny_llama, "disaggregated", "shm", prefill=1, decode=1)
        await c.start()
        transport = httpx.ASGITransport(app=build_app(c, "tiny"))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                assert (await http.get("/health")).json()["status"] == "ok"
                os.kill(c.instances["decode-0"].process.proc.pid, signal.SIGSTOP)
                lost = await http.post("/v1/completions", timeout=30, json={   # not streamed
                    "model": "tiny", "prompt": "hi", "max_tokens": 50})
                assert lost.status_code == 503 and "no decode instance" in lost.json()["error"]["message"]
                c.instances["decode-0"].process.proc.kill()
                await _until(lambda: not c.is_healthy, 10)
                down = await http.get("/health")
                assert down.status_code == 503 and down.headers["retry-after"]
                assert "decode-0" in down.json()["error"]["message"]
                busy = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
                assert busy.status_code == 503 and busy.headers["retry-after"]
                await _until(lambda: c.health()["status"] == "ok", 60)
                assert (await http.get("/health")).json() == {
                    "status": "ok", "missing": [], "instances": {"prefill-0": "up", "decode-0": "up"}}
                text = (await http.get("/metrics")).text
                assert 'distserve:instance_failures{model_name="tiny"} 1.0' in text
                assert 'distserve:instance_restarts{model_name="tiny"} 1.0' in text
                assert 'distserve:instance_up{instance="decode-0",model_name="tiny",role="decode"} 1.0' in text
                ok = await http.post("/v1/completions", json={
                    "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 160, "temperature": 0,
                    "ignore_eos": True})
                assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == reference[1][0]
                await _until(lambda: c.predict_ttft(10) is not None, 5)   # the prefill speed,
                assert 0 < c.predict_ttft(10) < c.predict_ttft(1000)      # as the instance measured it
        finally:
            await c.shutdown()

    asyncio.run(asyncio.wait_for(run(), 240))


def test_supervision_outlives_a_failed_round_and_brings_the_only_prefill_back(tiny_llama, reference):
    """The only prefill instance is killed for real, and stopping it raises (an injected
    fault: a process that takes longer than the wait to exit cannot be made here on demand).
    The failed supervision round is logged, the next ones run: the instance is restarted and
    the deployment serves again (a watch loop that died with the round left it down for good:
    every request a 503)."""
    async def run():
        c = _controller(tiny_llama, "disaggregated", prefill=1, decode=1)
        await c.start()
        try:
            handle = c.instances["prefill-0"].process
            real_stop = handle.stop

            def stop_fails_once(timeout=10.0):
                handle.stop = real_stop
                raise TimeoutError("the killed process did not exit in time (injected)")
            handle.stop = stop_fails_once
            os.kill(handle.proc.pid, signal.SIGKILL)
            await _until(lambda: c.counts()["instance_failures"] == 1, 15)
            await _until(lambda: c.health()["status"] == "ok", 60)   # restarted, rejoined
            assert c.counts()["instance_restarts"] == 1
            again = await _serve_all(c)
            _check(again, reference)
            await _no_leaks(c)
        finally:
            await c.shutdown()

    asyncio.run(asyncio.wait_for(run(), 240))
