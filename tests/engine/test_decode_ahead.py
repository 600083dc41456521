"""Several greedy decode steps in one call (EngineConfig.num_scheduler_steps, as vLLM's
multi-step scheduling; Engine._decode_ahead over csrc/decode_layers.cpp llama_decode_ahead):
the tokens, text and finish reasons of one step a call, whatever stops a request inside a
call; every KV block back; batches the call cannot serve step one token at a time."""
import json

import httpx
import pytest
import torch

from distserve import LLM, SamplingParams
from distserve.config import EngineConfig
from distserve.models.packed_linear import block_kernel
from helpers.tiny_models import build_tiny_model

needs_kernel = pytest.mark.skipif(block_kernel(32) is None,
                                  reason="no packed bf16 linear kernel of ours on this CPU or build")

PROMPTS = [[(7 * i + 3 * n) % 900 + 5 for i in range(n)] for n in (3, 17, 40, 9)]


def _llm(path, steps: int, **options) -> LLM:
    options = {"dtype": "bfloat16", "num_kv_blocks": 64, "block_size": 16, **options}
    return LLM(str(path), num_scheduler_steps=steps, **options)


def _calls(llm: LLM) -> list[list[int]]:
    """The steps of each request in every decode_ahead call the engine makes from now on (a
    spy on the real executor method)."""
    executor, calls = llm.engine.executor, []
    real = executor.decode_ahead
    executor.decode_ahead = lambda decodes, steps: calls.append(list(steps)) or real(decodes, steps)
    return calls


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory, tokenizer_dir):
    """A Llama whose head is its embedding, as SmolLM2's."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-tied"), tokenizer_dir, seed=5,
                            tie_word_embeddings=True)


def _first_new(tokens: list[int], start: int) -> int:
    """The first token at or after `start` that does not occur before it."""
    return next(t for i, t in enumerate(tokens) if i >= start and t not in tokens[:i])


def _run(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    outs = llm.generate(PROMPTS, params)
    alloc = llm.engine.kv.allocator
    assert alloc.num_free == alloc.num_blocks and not llm.engine.requests
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@needs_kernel
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2", "tiny_tied"])
def test_eight_steps_a_call_give_what_one_step_a_call_gives(request, model_fixture):
    path = request.getfixturevalue(model_fixture)
    one, eight = _llm(path, 1), _llm(path, 8)
    assert eight.engine.executor.can_decode_ahead
    free = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True) for _ in PROMPTS]
    ref = one.generate(PROMPTS, free)
    # stops that land inside a call: a token and a string the one-step run first meets mid-way
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=37, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                             stop_token_ids=[_first_new(ref[2].token_ids, 3)]),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                             stop=[ref[3].text[len(ref[3].text) // 2:][:2]])]
    calls = _calls(eight)
    got = _run(eight, params)
    assert got == _run(one, params)
    # the first call serves every request, each as far as it may go: request 0 has 4 left
    assert calls[0] == [4, 8, 8, 8] and all(max(c) <= 8 for c in calls)
    assert got[0][2] == "length" and len(got[0][0]) == 5 and len(got[1][0]) == 37
    assert got[2][2] == "stop" and got[3][2] == "stop" and len(got[3][0]) < 30


@needs_kernel
def test_a_call_writes_the_kv_one_step_a_call_writes(tiny_llama):
    """The same cache, bit for bit, after the same greedy requests (none stopping early)."""
    params = [SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)] * len(PROMPTS)
    one, eight = _llm(tiny_llama, 1), _llm(tiny_llama, 8)
    calls = _calls(eight)
    assert _run(eight, params) == _run(one, params)
    assert [max(c) for c in calls] == [8, 8, 4]
    assert torch.equal(eight.engine.executor.kv_cache, one.engine.executor.kv_cache)


@needs_kernel
def test_fewer_steps_a_call_where_the_free_blocks_are_short(tiny_llama):
    """Three blocks of 16 for two prompts of 12: after the prefill (13 tokens each) one
    block is free, two would be needed for 8 steps each (positions 12-19); 4 each (12-15) fit
    in the blocks they hold. Then one request waits (preempted), the other steps alone."""
    prompts = [PROMPTS[1][:12], PROMPTS[2][:12]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one, eight = _llm(tiny_llama, 1, num_kv_blocks=3), _llm(tiny_llama, 8, num_kv_blocks=3)
    calls = _calls(eight)
    got = [o.token_ids for o in eight.generate(prompts, params)]
    assert got == [o.token_ids for o in one.generate(prompts, params)]
    assert calls[0] == [4, 4]
    alloc = eight.engine.kv.allocator
    assert alloc.num_free == alloc.num_blocks


@needs_kernel
def test_a_call_never_runs_past_the_context(tiny_llama):
    """max_model_len 48: each request ends at its context limit, as one step a call ends it."""
    params = [SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)] * len(PROMPTS)
    one, eight = _llm(tiny_llama, 1, max_model_len=48), _llm(tiny_llama, 8, max_model_len=48)
    calls = _calls(eight)
    got = _run(eight, params)
    assert got == _run(one, params)
    assert [len(p) + len(t) for p, (t, _, _) in zip(PROMPTS, got)] == [48] * len(PROMPTS)
    # after the prompts (3, 17, 40, 9 tokens and one more each): 44, 30, 7 and 38 left
    assert calls[0] == [8, 8, 7, 8]


@needs_kernel
def test_sampled_or_logprob_requests_step_one_token_a_call(tiny_llama):
    """While a request samples or wants logprobs, its batch runs one step a call; greedy
    requests alone go on ahead once it has finished."""
    params = [SamplingParams(temperature=0.8, seed=7, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, logprobs=2, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    one, eight = _llm(tiny_llama, 1), _llm(tiny_llama, 8)
    calls = _calls(eight)
    assert _run(eight, params) == _run(one, params)
    # 6 tokens one a call (the first from the prompt), then 14 left: two calls of 8 and 6
    assert calls == [[8, 8], [6, 6]]


def test_float32_has_no_such_call_and_steps_one_token_at_a_time(tiny_llama):
    llm = _llm(tiny_llama, 8, dtype="float32")
    assert not llm.engine.executor.can_decode_ahead
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)] * len(PROMPTS)
    assert _run(llm, params) == _run(_llm(tiny_llama, 1, dtype="float32"), params)


@pytest.mark.parametrize("steps", [0, -1, 65])
def test_a_bad_number_of_steps_is_refused_by_name(steps):
    with pytest.raises(ValueError, match="num_scheduler_steps must be between 1 and 64"):
        EngineConfig(num_scheduler_steps=steps)


@needs_kernel
def test_a_server_streams_each_token_of_a_call(tiny_llama):
    """Over HTTP: a call's tokens reach the client as chunks, as one step a call sends them."""
    from tests.server.conftest import _serve
    served, server, thread = _serve(tiny_llama, 64, engine={"dtype": "bfloat16",
                                                            "num_scheduler_steps": 4})
    executor, calls = served.client.engine.executor, []
    real = executor.decode_ahead
    executor.decode_ahead = lambda decodes, steps: calls.append(list(steps)) or real(decodes, steps)
    try:
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 11, "temperature": 0,
                "ignore_eos": True}
        whole = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30).json()
        with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "stream": True},
                          timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        served.wait_idle()
    finally:
        server.should_exit = True
        thread.join(10)
        served.client.shutdown()
    single = _llm(tiny_llama, 1)
    ref = single.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=11,
                                                      ignore_eos=True))[0]
    # one step a call, each token's output, as the server would send them on
    single.engine.add(PROMPTS[1], SamplingParams(temperature=0, max_tokens=11, ignore_eos=True))
    outputs = []
    while single.engine.has_unfinished:
        outputs += single.engine.step().outputs
    sent = [o for o in outputs if o.new_text or o.finished]   # serving_completion's rule
    assert whole["choices"][0]["text"] == ref.text and whole["usage"]["completion_tokens"] == 11
    chunks = [json.loads(line[len("data: "):])["choices"][0] for line in lines]
    assert "".join(c["text"] for c in chunks) == ref.text
    assert chunks[-1]["finish_reason"] == "length"
    # 10 tokens after the first, in calls of 4, 4 and 2, twice; each token a chunk of its own
    assert calls == [[4], [4], [2]] * 2
    assert [c["text"] for c in chunks] == [o.new_text for o in sent]


def test_the_flag_reaches_every_instance():
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args
    for flags, steps in (([], 1), (["--num-scheduler-steps", "8"], 8)):
        args = build_parser().parse_args(["serve", "--prefill-instances", "1",
                                          "--decode-instances", "2", *flags])
        dep = deployment_from_args(args, engine_config_from_args(args, None))
        assert [s.config.num_scheduler_steps for s in dep.specs] == [steps] * 3
