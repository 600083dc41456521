"""AsyncEngine: same tokens as the synchronous engine, and no request outlives its consumer."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from distserve.config import EngineConfig
from distserve.engine.async_engine import AsyncEngine, EngineClient, EngineDeadError
from distserve.engine.engine import Engine
from distserve.request import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _engine(model_dir, num_kv_blocks: int = 24) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), dtype="float32",
                                        num_kv_blocks=num_kv_blocks, num_threads=1))


@pytest.fixture
def engine(tiny_llama):
    e = AsyncEngine(_engine(tiny_llama))
    yield e
    e.shutdown()
    alloc = e.engine.kv.allocator
    assert alloc.num_free == alloc.num_blocks
    alloc.check()


async def _drain(stream) -> tuple[list[int], str, str]:
    tokens, text, reason = [], "", None
    async for out in stream:
        tokens += out.new_token_ids
        text += out.new_text
        reason = out.finish_reason
    return tokens, text, reason


async def _until_idle(e: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = e.stats()
        if not s.num_running and not s.num_waiting and s.num_free_blocks == s.num_blocks:
            return
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.01)


def test_matches_the_synchronous_engine(tiny_llama, engine):
    assert isinstance(engine, EngineClient)
    prompts = ["Hello there", "A quite different and longer prompt about ships"]
    sync = _engine(tiny_llama)
    expected = []
    for p in prompts:
        req = sync.add(p, GREEDY)
        while sync.has_unfinished:
            sync.step()
        expected.append(req.output_token_ids)

    async def main():
        streams = [await engine.generate(p, GREEDY, f"r{i}") for i, p in enumerate(prompts)]
        return await asyncio.gather(*(_drain(s) for s in streams))

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected
    assert all(r[2] == "length" for r in results)


def test_bad_requests_raise_before_anything_runs(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await engine.generate([], GREEDY, "a")
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.generate([10 ** 9], GREEDY, "b")
        with pytest.raises(ValueError, match="context"):
            await engine.generate("hi", SamplingParams(max_tokens=engine.max_model_len), "c")
        s = await engine.generate("hi", GREEDY, "dup")
        with pytest.raises(ValueError, match="in use"):
            await engine.generate("hi", GREEDY, "dup")
        await _drain(s)

    asyncio.run(main())


def test_unset_max_tokens_stops_at_the_context(engine):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        return await _drain(await engine.generate([5] * 10, params, "long"))

    tokens, _, reason = asyncio.run(main())
    assert reason == "length" and len(tokens) == engine.max_model_len - 10


def test_leaving_early_aborts(engine):
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)

    async def main():
        # break + aclose, cancellation of the consuming task, and never reading at all
        s1 = await engine.generate("one", long, "leave")
        async for _ in s1:
            break
        await s1.aclose()
        s2 = await engine.generate("two", long, "cancel")
        task = asyncio.create_task(_drain(s2))
        await asyncio.sleep(0.05)
        task.cancel()
        s3 = await engine.generate("three", long, "ignored")
        del s3
        await _until_idle(engine)
        # an explicit abort ends the stream with finish_reason "abort"
        s4 = await engine.generate("four", long, "stop-me")
        await engine.abort("stop-me")
        return await _drain(s4)

    tokens, _, reason = asyncio.run(main())
    assert reason == "abort" and len(tokens) < 300


def _thread_cpu_s(native_id: int) -> float:
    """CPU time of one thread of this process (user + system), from /proc."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_loop_sleeps(engine):
    """The engine's own thread, not the process (whose other threads are other tests')."""
    time.sleep(0.1)
    tid = engine._thread.native_id
    cpu = _thread_cpu_s(tid)
    time.sleep(0.5)
    assert _thread_cpu_s(tid) - cpu < 0.1


def test_shutdown_ends_open_streams(engine):
    async def main():
        s = await engine.generate("hi", SamplingParams(max_tokens=300, ignore_eos=True), "x")
        await s.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            await _drain(s)
        with pytest.raises(EngineDeadError):
            await engine.generate("hi", GREEDY, "y")

    asyncio.run(main())
    assert not engine.is_healthy


def test_a_failing_step_frees_everything(tiny_llama):
    sync = _engine(tiny_llama)
    real_step, calls = sync.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    sync.step = step
    e = AsyncEngine(sync)

    async def main():
        s = await e.generate("hi", SamplingParams(max_tokens=50, ignore_eos=True), "x")
        with pytest.raises(EngineDeadError, match="boom"):
            await _drain(s)

    asyncio.run(main())
    assert not e.is_healthy
    assert sync.kv.allocator.num_free == sync.kv.allocator.num_blocks
