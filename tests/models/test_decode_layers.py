"""The fused decode stack (models/decode_layers.py: every layer of a decode step in one C++
call): bit for bit the values of the layers' Python forward where it applies, and the Python
forward wherever it does not."""
import pytest
import torch

from distserve import LLM, SamplingParams
from distserve.engine.batch import Batch, DecodeRow, PrefillRow, prepare
from distserve.models.decode_layers import DecodeLayers
from distserve.models.packed_linear import block_kernel

pytestmark = pytest.mark.skipif(block_kernel(32) is None,
                                reason="no packed bf16 linear kernel of ours on this CPU or build")

BLOCK = 16


def _engine(path) -> LLM:
    return LLM(str(path), dtype="bfloat16", num_kv_blocks=64, block_size=BLOCK)


def _prefilled(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's K/V written into its own blocks of the cache; their block tables."""
    runner = llm.engine.executor.worker.runner
    tables, next_block = [], 8   # blocks past the warm-up's scratch ones
    for p in prompts:
        table = list(range(next_block, next_block + len(p) // BLOCK + 2))
        next_block += len(table)
        runner.run_batch(Batch([PrefillRow(p, 0, table, True)]))
        tables.append(table)
    return tables


def _layers_both_ways(model, runner, batch: Batch, residual: torch.Tensor | None = None):
    """(x, residual, cache) after the layers, fused and by the Python forward, each from the
    same cache."""
    inputs = prepare(batch, runner.block_size, runner.device)
    results = []
    for fused in (True, False):
        model.fused_decode = fused
        cache = runner.kv_cache.clone()
        x, _ = model.embed(inputs.input_ids, inputs.positions)
        state = (x, None if residual is None else residual.clone())
        assert model._decode_layers().applies(x, state[1], cache, inputs.meta)
        with torch.inference_mode():
            out = model.run_layers(state, inputs.positions, cache, inputs.meta)
        results.append((*out, cache))
    model.fused_decode = True
    return results


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("lengths", [[5], [17, 3, 40]])
def test_a_decode_step_is_bit_for_bit_the_python_layers(request, model_fixture, lengths):
    llm = _engine(request.getfixturevalue(model_fixture))
    runner, model = llm.engine.executor.worker.runner, llm.engine.executor.worker.model
    assert isinstance(model._decode_layers(), DecodeLayers)
    prompts = [[(7 * i + 3 * n) % 1000 + 5 for i in range(n)] for n in lengths]
    tables = _prefilled(llm, prompts)
    decode = Batch(decodes=[DecodeRow(11 + i, len(p) + 1, t) for i, (p, t) in enumerate(zip(prompts, tables))])
    (fx, fres, fcache), (px, pres, pcache) = _layers_both_ways(model, runner, decode)
    assert torch.equal(fx, px) and torch.equal(fres, pres)
    assert torch.equal(fcache, pcache)       # the new tokens' K/V written alike
    assert not torch.equal(fcache, runner.kv_cache)
    # a later pipeline stage: the stack starts from a residual handed over
    residual = torch.randn(len(lengths), fx.shape[1], dtype=torch.bfloat16)
    (fx, fres, _), (px, pres, _) = _layers_both_ways(model, runner, decode, residual)
    assert torch.equal(fx, px) and torch.equal(fres, pres)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
def test_the_logits_of_a_decode_step_are_bit_for_bit_the_python_path(request, model_fixture,
                                                                      monkeypatch):
    """Layers, final norm and head in one C++ call (llama_decode_logits), against the layers'
    Python forward, the norm module and the head module."""
    llm = _engine(request.getfixturevalue(model_fixture))
    runner, model = llm.engine.executor.worker.runner, llm.engine.executor.worker.model
    prompts = [[(5 * i + 2 * n) % 1000 + 7 for i in range(n)] for n in (9, 30)]
    tables = _prefilled(llm, prompts)
    batch = Batch(decodes=[DecodeRow(13 + i, len(p) + 1, t) for i, (p, t) in enumerate(zip(prompts, tables))])
    inputs = prepare(batch, runner.block_size, runner.device)
    assert model._decode_tail() is model._decode_layers() is not None
    results = []
    for fused in (True, False):
        model.fused_decode = fused
        cache = runner.kv_cache.clone()
        with torch.inference_mode():
            results.append((model.sampled_logits(inputs.input_ids, inputs.positions, cache,
                                                 inputs.meta, inputs.logit_rows), cache))
    model.fused_decode = True
    (fused_logits, fused_cache), (plain_logits, plain_cache) = results
    assert fused_logits.shape == (2, model.args.vocab_size)
    assert torch.equal(fused_logits, plain_logits) and torch.equal(fused_cache, plain_cache)
    # the fused call is the one the runner makes for a decode-only batch
    seen, logits = [], DecodeLayers.logits
    monkeypatch.setattr(DecodeLayers, "logits", lambda *a: seen.append(1) or logits(*a))
    with torch.inference_mode():
        runner.run_batch(batch)
    assert seen == [1]


def test_greedy_tokens_are_the_same_fused_or_not(tiny_llama):
    llm = _engine(tiny_llama)
    model = llm.engine.executor.worker.model
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # past a block boundary
    prompts = ["The capital of France is", "def fib(n):", "1, 2, 3,"]
    fused = [o.token_ids for o in llm.generate(prompts, params)]
    model.fused_decode = False
    plain = [o.token_ids for o in llm.generate(prompts, params)]
    assert fused == plain and all(len(t) == 40 for t in fused)


def test_it_steps_aside_where_the_python_layers_must_run(tiny_llama):
    llm = _engine(tiny_llama)
    runner, model = llm.engine.executor.worker.runner, llm.engine.executor.worker.model
    stack = model._decode_layers()
    mixed = prepare(Batch([PrefillRow([5, 6, 7], 0, [9], True)], [DecodeRow(4, 3, [8])]),
                    BLOCK, runner.device)
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert not stack.applies(x, None, runner.kv_cache, mixed.meta)          # a prefill in the batch
    decode = prepare(Batch(decodes=[DecodeRow(4, 3, [8])]), BLOCK, runner.device).meta
    assert stack.applies(x[:1], None, runner.kv_cache, decode)
    assert not stack.applies(x[:1].float(), None, runner.kv_cache, decode)  # float32 activations
    # tensor parallel: a sum over workers between the kernels
    model.layers[1].mlp.tp_reduce = lambda t: t
    assert DecodeLayers.of(model.layers) is None
    # float32 weights are not packed: F.linear keeps float32 runs exact
    f32 = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=16, block_size=BLOCK)
    assert DecodeLayers.of(f32.engine.executor.worker.model.layers) is None
