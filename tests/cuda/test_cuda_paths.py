"""The CUDA paths, where a GPU is present (skipped elsewhere): the engine's tokens equal
transformers' on the GPU, KV moves GPU -> host -> tcp -> GPU, or GPU to GPU over CUDA IPC,
between a prefill and a decode instance (and between two bare processes, byte for byte), and
parallel instances (NCCL for CUDA tensors, gloo for the control tensors) give the same tokens,
each worker moving its own share of the KV."""
from __future__ import annotations

import asyncio
import pathlib
import select
import subprocess
import sys

import msgspec
import pytest
import torch

from cuda_ipc_child import NUM_BLOCKS, SHAPE, expected_cache
from distserve import LLM, SamplingParams
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.cluster.local import LocalLauncher
from distserve.config import EngineConfig
from distserve.controller import Controller
from distserve.kv.cache import allocate_kv_cache
from distserve.transfer import KVEndpoint, TransferError, make_puller
from distserve.transfer.base import Region
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_graphs_and_triton_attention_give_the_eager_tokens(tiny_llama, expected, dtype):
    """Decode steps replayed from CUDA graphs (Triton's paged attention inside) against
    --enforce-eager; in float32 both equal transformers'."""
    pytest.importorskip("triton")
    runs = {}
    for eager in (False, True):
        with LLM(str(tiny_llama), dtype=dtype, device="cuda", num_kv_blocks=64, max_num_seqs=8,
                 enforce_eager=eager) as llm:
            graphs = llm.engine.executor.worker.runner.graphs
            assert (graphs is None) == eager
            runs[eager] = [r.token_ids for r in llm.generate(PROMPTS, GREEDY)]
            if not eager:
                assert sorted(graphs.graphs) == [1, 2, 4, 8] and graphs.steps.get(4, 0) >= NEW - 1
            assert llm.engine.kv.allocator.num_free == llm.engine.kv.allocator.num_blocks
    assert runs[False] == runs[True]
    if dtype == "float32":
        assert runs[False] == expected


@needs_two_gpus
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_instance_on_cuda_matches_transformers(tiny_llama, expected, tp, pp):
    with LLM(str(tiny_llama), dtype="float32", device="cuda", num_kv_blocks=64,
             tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
        out = llm.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in out] == expected


def _serve(model, prefill_parallel, decode_parallel, transfer="tcp"):
    base = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64, device="cuda")
    deployment = Deployment(base, "disaggregated", transfer=transfer,
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
        c = Controller(deployment.specs, str(model), LocalLauncher(), transfer=transfer)
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


@pytest.mark.parametrize("transfer", ["tcp", "cuda_ipc"])
def test_disaggregated_on_cuda(tiny_llama, expected, monkeypatch, transfer):
    if torch.cuda.device_count() < 2:  # listed twice: both instances share the one GPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,0")
    _check_served(*_serve(tiny_llama, (1, 1), (1, 1), transfer), expected)


CUDA_IPC_CHILD = pathlib.Path(__file__).with_name("cuda_ipc_child.py")


def test_cuda_ipc_pull_from_another_process():
    """A decode side pulls blocks GPU to GPU from a source process's cache, exactly, then is
    refused once that process is gone."""
    proc = subprocess.Popen([sys.executable, str(CUDA_IPC_CHILD)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    puller = make_puller("cuda_ipc", secret=b"cuda_ipc checks no secret")
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the cuda_ipc child printed no endpoint within 120 s"
        line = proc.stdout.readline().decode().strip()
        assert line, f"the cuda_ipc child exited with {proc.wait(timeout=30)}"
        endpoint = msgspec.msgpack.decode(bytes.fromhex(line), type=KVEndpoint)
        assert endpoint.backend == "cuda_ipc" and endpoint.pid == proc.pid
        # as the control plane carries it: to_builtins (bytes as base64), then convert
        endpoint = msgspec.convert(msgspec.to_builtins(endpoint), KVEndpoint)
        expected = expected_cache()
        dst = allocate_kv_cache(SHAPE, 16, torch.float32, device="cuda:0")
        src_ids, dst_ids = [17, 2, 9, 23, 0], [4, 15, 0, 8, 11]
        stats = puller.pull(endpoint, src_ids, dst, dst_ids)
        assert stats.nbytes == 5 * SHAPE.bytes_per_block(torch.float32) and stats.seconds > 0
        assert torch.equal(dst[dst_ids].cpu(), expected[src_ids])
        assert not dst[[b for b in range(16) if b not in dst_ids]].any()
        # again, through the cached mapping, over blocks just written
        puller.pull(endpoint, [NUM_BLOCKS - 1], dst, [4])
        assert torch.equal(dst[4].cpu(), expected[NUM_BLOCKS - 1])
        # a region, as a worker of another TP x PP split fetches it: it stays on the GPU
        rows, stats = puller.fetch(endpoint, [3, 5], Region(1, 2, 0, 1))
        assert rows.device.type == "cuda" and stats.nbytes == rows.nbytes
        assert torch.equal(rows.cpu(), expected[[3, 5]][:, 1:2, :, :, 0:1])
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        with pytest.raises(TransferError, match="closed or died"):
            puller.pull(endpoint, [1], dst, [0])
    finally:
        puller.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs (2 workers a phase)")
def test_disaggregated_parallel_phases_on_cuda(tiny_llama, expected):
    _check_served(*_serve(tiny_llama, (2, 1), (1, 2)), expected)
