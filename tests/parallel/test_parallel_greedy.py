"""Tensor- and pipeline-parallel instances give transformers' greedy tokens, with real worker
processes over gloo (slow on 2 cores, never wrong)."""
from __future__ import annotations

import pytest
import torch
import transformers

from distserve import LLM, SamplingParams

MAX_NEW = 12
PROMPT_WORDS = [3, 17, 40]


@pytest.fixture(scope="module", params=["llama", "opt"])
def reference(request):
    path = request.getfixturevalue(f"tiny_{request.param}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = tok.encode("the quick brown fox jumps over the lazy dog while a small cat watches " * 6)
    prompts = [ids[i:i + n] for i, n in enumerate(PROMPT_WORDS)]
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                    for p in prompts]
    return path, prompts, expected


@pytest.mark.parametrize("tp,pp,policy", [(2, 1, "prefill-first"), (1, 2, "chunked"),
                                          (2, 2, "prefill-first")])
def test_parallel_greedy_matches_transformers(reference, tp, pp, policy):
    path, prompts, expected = reference
    with LLM(str(path), dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             num_kv_blocks=64, policy=policy, max_num_batched_tokens=24, num_threads=1) as llm:
        results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                       ignore_eos=True))
        alloc = llm.engine.kv.allocator
        assert alloc.num_free == alloc.num_blocks
    for p, exp, res in zip(prompts, expected, results):
        assert res.token_ids == exp, f"TP {tp} x PP {pp}: prompt of {len(p)} tokens diverged"
