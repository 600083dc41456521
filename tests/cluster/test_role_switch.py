"""An instance switches between prefill and decode in place, under load, through real
instance processes: every request finishes with the tokens of colocated serving, none is
lost, every KV block comes back, and the switched instance serves in its new role."""
from __future__ import annotations

import asyncio

import pytest

from distserve import LLM, SamplingParams
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.cluster.local import LocalLauncher
from distserve.config import EngineConfig
from distserve.controller import Controller
from distserve.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, my name is", "The capital of France is", "x", "Once upon a time there was",
           "In the beginning the", "A quick brown fox"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
DECODE_STEPS = 3 * 3 * len(PROMPTS) * 23   # request-steps: 3 waves x 3 x each prompt, 23 tokens


async def _collect(c, prompt, rid):
    toks = []
    async for out in await c.generate(prompt, GREEDY, rid):
        toks += out.new_token_ids
    return toks


async def _all_free(c, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        stats = c.instance_stats()
        if stats and all(s.num_free_blocks == s.num_blocks for s in stats):
            return True
        await asyncio.sleep(0.05)
    return False


def test_role_switch_under_load_loses_no_request(tiny_llama):
    expected = [r.token_ids for r in LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64)
                .generate(PROMPTS, GREEDY)]
    base = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64)
    deployment = Deployment(base, "disaggregated", prefill=PhaseSettings(2),
                            decode=PhaseSettings(1), pin_cpus=False)
    assert deployment.make_switchable() == []

    async def run():
        c = Controller(deployment.specs, str(tiny_llama), LocalLauncher())
        await c.start()
        try:
            async def wave(tag, switch=None):
                """Every prompt three times at once; `switch` runs while they are in flight."""
                jobs = [asyncio.create_task(_collect(c, p, f"{tag}-{k}-{i}"))
                        for k in range(3) for i, p in enumerate(PROMPTS)]
                await asyncio.sleep(0.05)
                if switch is not None:
                    await switch
                return await asyncio.gather(*jobs)

            first = await wave("a", c.switch_role("prefill-1", "decode"))
            roles_after = dict(c.roles())
            second = await wave("b")   # two decode instances now: the switched one pulls KV
            freed_between = await _all_free(c)   # and its last stats are in
            pulled = c.instances["prefill-1"].stats.num_transfers
            third = await wave("c", c.switch_role("prefill-1", "prefill"))
            freed = await _all_free(c)
            try:   # two prefill instances and one decode again: the decode one must stay
                await c.switch_role("decode-0", "prefill")
                refusal = ""
            except ValueError as e:
                refusal = str(e)
            for _ in range(100):   # an instance's last step is sent once it is timed
                steps = c.recent_steps(0.0)
                if sum(s.decode_batch for s in steps) >= DECODE_STEPS:
                    break
                await asyncio.sleep(0.05)
            return (first, second, third, roles_after, pulled, freed_between and freed, refusal,
                    c.counts(), dict(c.roles()), steps)
        finally:
            await c.shutdown()

    first, second, third, roles_after, pulled, freed, refusal, counts, roles, steps = asyncio.run(run())
    for wave_out in (first, second, third):
        assert wave_out == [expected[i] for _ in range(3) for i in range(len(PROMPTS))]
    assert roles_after == {"prefill": 1, "decode": 2}
    assert pulled > 0   # the switched instance pulled KV as a decode instance
    assert roles == {"prefill": 2, "decode": 1}
    assert counts["role_switches"] == 2
    assert freed, "a KV block was left held"
    assert "last decode instance" in refusal
    # switchable instances time each one-phase step for --adapt's measured speed: every
    # prompt token was prefilled in a timed step, and every token after the first decoded
    prompt_tokens = sum(len(load_tokenizer(str(tiny_llama)).encode(p)) for p in PROMPTS)
    prefills = [s for s in steps if s.prefill_lens]
    decodes = [s for s in steps if s.decode_batch]
    assert len(prefills) + len(decodes) == len(steps)
    assert sum(sum(s.prefill_lens) for s in prefills) == 3 * 3 * prompt_tokens
    assert sum(s.decode_batch for s in decodes) == DECODE_STEPS
    assert all(s.seconds > 0 for s in steps)
    assert all(s.decode_batch <= s.decode_context_sum <= s.decode_batch * s.decode_context_max
               for s in decodes)
