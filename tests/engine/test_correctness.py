"""Greedy outputs of the engine equal Hugging Face transformers' generate, token for token."""
from __future__ import annotations

import pytest
import torch
import transformers

from distserve import LLM, SamplingParams

MAX_NEW = 24
# lengths chosen to end inside, exactly at and across 16-token block boundaries
PROMPT_WORDS = [2, 15, 16, 31, 47, 70]


def _prompts(tokenizer) -> list[list[int]]:
    text = ("the quick brown fox jumps over the lazy dog while a small cat watches from the "
            "warm window and the rain keeps falling on the old town ") * 8
    ids = tokenizer.encode(text)
    return [ids[i:i + n] for i, n in enumerate(PROMPT_WORDS)]


@pytest.fixture(scope="module", params=["llama", "opt"])
def model_and_reference(request):
    path = request.getfixturevalue(f"tiny_{request.param}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    prompts = _prompts(tok)
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              do_sample=False, pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    return path, prompts, expected


@pytest.mark.parametrize("policy,num_kv_blocks,batched_tokens", [
    ("prefill-first", 128, 2048),
    ("chunked", 128, 32),          # prompts split into chunks mixed with decodes
    ("prefill-first", 9, 2048),    # tiny KV cache: preemption by recomputation
    ("chunked", 9, 24),
])
def test_greedy_matches_transformers(model_and_reference, policy, num_kv_blocks, batched_tokens):
    path, prompts, expected = model_and_reference
    llm = LLM(str(path), dtype="float32", policy=policy, num_kv_blocks=num_kv_blocks,
              max_num_batched_tokens=batched_tokens)
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    for ids, exp, res in zip(prompts, expected, results):
        assert res.token_ids == exp, f"prompt of {len(ids)} tokens diverged"
        assert res.finish_reason == "length"
    preemptions = sum(r.metrics["num_preemptions"] for r in results)
    if num_kv_blocks < 10:
        assert preemptions > 0, "the tiny KV budget was meant to force preemption"
    alloc = llm.engine.kv.allocator
    alloc.check()
    assert alloc.num_free == alloc.num_blocks


def test_request_longer_than_the_kv_cache_ends_with_length(tiny_llama):
    """A lone request may use the whole cache, but not more: it ends, it does not hang."""
    llm = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=2, block_size=16)
    res = llm.generate([[5] * 5], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 32 - 5
    assert llm.engine.kv.allocator.num_free == 2


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_bfloat16_agrees_with_transformers(request, kind):
    """bf16 runs other kernels than float32 (on CPU, oneDNN-packed linears; rotary and
    attention in bf16): its first two tokens' distributions must still match transformers'
    bf16 within bf16 rounding, through both the prefill and the decode path. (bf16 logits
    can tie, so the chosen token must be a best one, not necessarily transformers' pick.)"""
    path = request.getfixturevalue(f"tiny_{kind}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    prompts = _prompts(transformers.AutoTokenizer.from_pretrained(str(path)))
    llm = LLM(str(path), dtype="bfloat16", num_kv_blocks=128)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=5)
    for ids, res in zip(prompts, llm.generate(prompts, params)):
        for step in range(2):
            with torch.no_grad():
                logits = hf(torch.tensor([ids + res.token_ids[:step]])).logits[0, -1]
            expected = torch.log_softmax(logits.float(), dim=-1)
            chosen = res.token_ids[step]
            assert expected[chosen] >= expected.max() - 0.05, f"step {step}, {len(ids)}-token prompt"
            for token, logprob in res.top_logprobs[step].items():
                assert logprob == pytest.approx(expected[token].item(), abs=0.05)
