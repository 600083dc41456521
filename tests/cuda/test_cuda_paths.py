"""The CUDA paths, where a GPU is present (skipped elsewhere): the engine's tokens equal
transformers' on the GPU, KV moves GPU -> host -> tcp -> GPU between a prefill and a decode
instance, and parallel instances (NCCL for CUDA tensors, gloo for the control tensors) give
the same tokens, each worker moving its own share of the KV."""
from __future__ import annotations

import asyncio

import pytest
import torch

from distserve import LLM, SamplingParams
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.cluster.local import LocalLauncher
from distserve.config import EngineConfig
from distserve.controller import Controller
from helpers.reference import transformers_greedy

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="NCCL needs a GPU per worker")

PROMPTS = ["Hello, my name is", "The capital of France is a city with many bridges, and",
           "x", "Once upon a time"]
NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return transformers_greedy(tiny_llama, PROMPTS, NEW)


def test_engine_on_cuda_matches_transformers(tiny_llama, expected):
    with LLM(str(tiny_llama), dtype="float32", device="cuda", num_kv_blocks=64) as llm:
        assert llm.engine.executor.kv_cache.device.type == "cuda"
        out = llm.generate(PROMPTS, GREEDY)
        alloc = llm.engine.kv.allocator
        assert alloc.num_free == alloc.num_blocks
    assert [r.token_ids for r in out] == expected


@needs_two_gpus
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_instance_on_cuda_matches_transformers(tiny_llama, expected, tp, pp):
    with LLM(str(tiny_llama), dtype="float32", device="cuda", num_kv_blocks=64,
             tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
        out = llm.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in out] == expected


def _serve(model, prefill_parallel, decode_parallel):
    base = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64, device="cuda")
    deployment = Deployment(base, "disaggregated", transfer="tcp",
                            prefill=PhaseSettings(1, tensor_parallel_size=prefill_parallel[0],
                                                  pipeline_parallel_size=prefill_parallel[1]),
                            decode=PhaseSettings(1, tensor_parallel_size=decode_parallel[0],
                                                 pipeline_parallel_size=decode_parallel[1]))

    async def collect(c, prompt, rid):
        toks, last = [], None
        async for out in await c.generate(prompt, GREEDY, rid):
            toks += out.new_token_ids
            last = out
        return toks, last

    async def run():
        c = Controller(deployment.specs, str(model), LocalLauncher(), transfer="tcp")
        await c.start()
        try:
            results = await asyncio.gather(*[collect(c, p, f"r{i}") for i, p in enumerate(PROMPTS)])
            for _ in range(200):
                stats = c.instance_stats()
                if all(s.num_free_blocks == s.num_blocks for s in stats):
                    break
                await asyncio.sleep(0.05)
            return results, stats
        finally:
            await c.shutdown()
    return asyncio.run(asyncio.wait_for(run(), 300))


def _check_served(results, stats, expected):
    kv_bytes_per_block = 2 * 2 * 16 * 2 * 4 * 16   # tiny_llama, float32
    for (toks, last), exp in zip(results, expected):
        assert toks == exp
        assert last.extra["kv_transfer_bytes"] == -(-last.num_prompt_tokens // 16) * kv_bytes_per_block
    for s in stats:
        assert s.num_free_blocks == s.num_blocks, f"{s.instance_id} leaked blocks"


def test_disaggregated_on_cuda_over_tcp(tiny_llama, expected, monkeypatch):
    if torch.cuda.device_count() < 2:  # listed twice: both instances share the one GPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,0")
    _check_served(*_serve(tiny_llama, (1, 1), (1, 1)), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs (2 workers a phase)")
def test_disaggregated_parallel_phases_on_cuda(tiny_llama, expected):
    _check_served(*_serve(tiny_llama, (2, 1), (1, 2)), expected)
