"""Decode steps through CUDA graphs' static buffers (engine/cuda_graphs.py). The capture needs
a GPU (tests/cuda); here the same buffers and padding run eagerly on CPU, so what a graph
would replay is checked on every machine: batches padded up to a graph's size give the tokens
of the plain path, and batches no graph fits go the plain way."""
import pytest

from distserve import LLM, SamplingParams
from distserve.engine.batch import Batch, DecodeRow, PrefillRow
from distserve.engine.cuda_graphs import DecodeGraphs

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # past a block boundary
PROMPTS = ["The capital of France is", "def fib(n):", "1, 2, 3,", "Once upon a time", "x"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
               max_model_len=256)


def _graphs(llm, max_batch):
    runner = llm.engine.executor.worker.runner
    return runner, DecodeGraphs(runner.model, runner.kv_cache, runner.block_size, 256, max_batch,
                                capture=False)


@pytest.mark.parametrize("count", [1, 3, 5])
def test_padded_decode_steps_give_the_plain_paths_tokens(llm, count):
    runner, graphs = _graphs(llm, max_batch=8)
    plain = [o.token_ids for o in llm.generate(PROMPTS[:count], GREEDY)]
    runner.graphs = graphs
    try:
        padded = [o.token_ids for o in llm.generate(PROMPTS[:count], GREEDY)]
    finally:
        runner.graphs = None
    assert padded == plain
    size = graphs.size_for(count)
    assert size >= count and graphs.steps.get(size, 0) >= GREEDY.max_tokens - 1
    assert llm.engine.kv.usage == 0   # every block freed


def test_batches_no_graph_fits_take_the_plain_path(llm):
    _, graphs = _graphs(llm, max_batch=4)
    assert graphs.sizes == [1, 2, 4]
    row = DecodeRow(5, 3, [9])
    assert graphs.run(Batch(decodes=[row] * 5)) is None                     # past the largest
    assert graphs.run(Batch([PrefillRow([5, 6], 0, [9], True)], [row])) is None   # a prefill
    assert graphs.run(Batch(decodes=[DecodeRow(5, 3, list(range(33)))])) is None  # table too long
    assert graphs.steps == {}
    assert graphs.run(Batch(decodes=[row] * 3)).shape[0] == 3 and graphs.steps == {4: 1}


def test_enforce_eager_reaches_every_instance():
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args
    for flags, eager in (([], False), (["--enforce-eager"], True)):
        args = build_parser().parse_args(["serve", "--prefill-instances", "1",
                                          "--decode-instances", "2", *flags])
        dep = deployment_from_args(args, engine_config_from_args(args, None))
        assert [s.config.enforce_eager for s in dep.specs] == [eager] * 3
