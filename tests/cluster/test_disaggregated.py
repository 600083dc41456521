"""Disaggregated serving through real instance processes: same tokens as colocated serving
and as transformers, KV moved by both transfer backends, every block freed after aborts."""
from __future__ import annotations

import asyncio

import pytest

from distserve import LLM, SamplingParams
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.config import EngineConfig
from distserve.cluster.local import LocalLauncher
from distserve.controller import Controller
from helpers.reference import transformers_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, my name is",
           "The capital of France is a city with many bridges, and the river that runs "
           "through it has carried boats for a thousand years while",
           "x", "Once upon a time"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(tiny_llama):
    out = transformers_greedy(tiny_llama, PROMPTS, 24)
    colocated = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64).generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in colocated] == out
    return out, [r.text for r in colocated]


def _deployment(model, prefill, decode, transfer, decode_blocks=64, kv_checksum=False,
                prefill_parallel=(None, None), decode_parallel=(None, None)):
    """A small decode cache makes migrations wait for room, and preempts on the decode side.
    *_parallel: (TP, PP) of that phase's instances."""
    base = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64, kv_checksum=kv_checksum)
    return Deployment(base, "disaggregated",
                      prefill=PhaseSettings(prefill, tensor_parallel_size=prefill_parallel[0],
                                            pipeline_parallel_size=prefill_parallel[1]),
                      decode=PhaseSettings(decode, num_kv_blocks=decode_blocks,
                                           tensor_parallel_size=decode_parallel[0],
                                           pipeline_parallel_size=decode_parallel[1]),
                      transfer=transfer)


async def _collect(controller, prompt, rid, params=GREEDY):
    toks, text, last = [], "", None
    async for out in await controller.generate(prompt, params, rid):
        toks += out.new_token_ids
        text += out.new_text
        last = out
    return toks, text, last


async def _wait_all_free(controller, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        stats = controller.instance_stats()
        if all(s.num_free_blocks == s.num_blocks for s in stats):
            return stats
        await asyncio.sleep(0.05)
    return controller.instance_stats()


@pytest.mark.parametrize("prefill,decode,transfer,decode_blocks,kv_checksum,parallel", [
    (1, 1, "shm", 64, False, None), (2, 1, "tcp", 64, True, None), (1, 1, "shm", 10, False, None),
    # phases with their own parallelism: the decode side reshards the KV it pulls
    (1, 1, "shm", 64, False, ((2, 1), (1, 1))), (1, 1, "tcp", 64, False, ((1, 2), (2, 1)))])
def test_disaggregated_matches_colocated_and_transformers(tiny_llama, expected, prefill, decode,
                                                          transfer, decode_blocks, kv_checksum,
                                                          parallel):
    tokens, texts = expected
    prefill_parallel, decode_parallel = parallel or ((None, None), (None, None))

    async def run():
        deployment = _deployment(tiny_llama, prefill, decode, transfer, decode_blocks, kv_checksum,
                                 prefill_parallel, decode_parallel)
        c = Controller(deployment.specs, str(tiny_llama), LocalLauncher(), transfer=transfer)
        await c.start()
        try:
            results = await asyncio.gather(*[_collect(c, p, f"r{i}") for i, p in enumerate(PROMPTS)])
            # a burst in which half the clients leave early: every block must come back
            async def leave_early(i):
                stream = await c.generate(PROMPTS[i % len(PROMPTS)],
                                          SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                                          f"burst-{i}")
                async for out in stream:
                    if out.new_token_ids and i % 2 == 0:
                        break  # leaving the loop drops the stream, which aborts the request
                await stream.aclose()
            await asyncio.gather(*[leave_early(i) for i in range(12)])
            stats = await _wait_all_free(c)
            return results, stats, c.transfer_bytes
        finally:
            await c.shutdown()

    results, stats, moved = asyncio.run(run())
    # float32, tiny model: 2 layers x 2 KV heads x 16 head dim x K and V x 4 bytes a token
    kv_bytes_per_block = 2 * 2 * 16 * 2 * 4 * 16
    for (toks, text, last), exp_toks, exp_text in zip(results, tokens, texts):
        assert toks == exp_toks
        assert text == exp_text
        assert last.finish_reason == "length"
        assert last.extra["kv_transfer_bytes"] > 0
        prompt_blocks = -(-last.num_prompt_tokens // 16)
        assert last.extra["kv_transfer_bytes"] == prompt_blocks * kv_bytes_per_block  # once
    assert moved > 0
    assert {s.role for s in stats} == {"prefill", "decode"}
    for s in stats:
        assert s.num_free_blocks == s.num_blocks, f"{s.instance_id} leaked blocks"


def test_colocated_instance_processes_match(tiny_llama, expected):
    """The baseline deployment (colocated instance processes) goes through the same controller."""
    tokens, _ = expected
    base = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64)
    deployment = Deployment(base, "colocated", colocated=PhaseSettings(2))

    async def run():
        c = Controller(deployment.specs, str(tiny_llama), LocalLauncher())
        await c.start()
        try:
            results = await asyncio.gather(*[_collect(c, p, f"r{i}") for i, p in enumerate(PROMPTS)])
            return results, await _wait_all_free(c)
        finally:
            await c.shutdown()

    results, stats = asyncio.run(run())
    assert [r[0] for r in results] == tokens
    assert len(stats) == 2 and all(s.num_free_blocks == s.num_blocks for s in stats)


def test_a_dead_decode_instance_fails_its_requests_instead_of_hanging(tiny_llama):
    from distserve.engine.async_engine import EngineDeadError

    async def run():
        c = Controller(_deployment(tiny_llama, 1, 1, "shm").specs, str(tiny_llama), LocalLauncher())
        await c.start()
        try:
            stream = await c.generate("Hello there", SamplingParams(temperature=0, max_tokens=480,
                                                                    ignore_eos=True), "victim")
            first = await stream.__anext__()
            assert first.new_token_ids
            c.instances["decode-0"].process.proc.kill()
            with pytest.raises(EngineDeadError, match="decode-0"):
                async for _ in stream:
                    pass
            assert not c.is_healthy
            with pytest.raises(EngineDeadError):
                await c.generate("again", GREEDY, "after")
        finally:
            await c.shutdown()

    asyncio.run(asyncio.wait_for(run(), 120))
