"""The GGUF path gives the logits transformers gives when it loads the same GGUF file."""
import pytest
import torch
import transformers

from distserve import LLM, SamplingParams
from distserve.models.locate import find_default_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both():
    gguf = find_default_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = LLM(str(gguf), dtype="float32", num_kv_blocks=64)
    return hf, ours


def test_prefill_logits_match(both):
    hf, ours = both
    ids = ours.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    req = ours.engine.add(ids, SamplingParams(temperature=0, max_tokens=1))
    batch = ours.engine.scheduler.schedule()
    result = ours.engine.executor.worker.runner.run(batch.prefills, batch.decodes)
    ours.engine.abort(req.request_id)
    got = result.logits[0]
    assert (got - expected).abs().max().item() < 1e-3 * expected.abs().max().item()
    assert got.argmax() == expected.argmax()


def test_greedy_continuation_matches(both):
    hf, ours = both
    ids = ours.tokenizer.encode("Once upon a time, in a small village,")
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):]
    res = ours.generate([ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    n = len(out)
    assert res.token_ids[:n] == out.tolist()
