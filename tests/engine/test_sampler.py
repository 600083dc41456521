import pytest
import torch

from distserve.engine.sampler import sample
from distserve.request import Request, SamplingParams


def _reqs(*params):
    return [Request(f"r{i}", [1], p) for i, p in enumerate(params)]


def test_greedy_picks_argmax_and_reports_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    res = sample(logits, _reqs(SamplingParams(temperature=0, logprobs=2),
                               SamplingParams(temperature=0)))
    assert res.token_ids == [1, 0]
    expected = torch.log_softmax(logits, -1)
    assert res.logprobs[0] == pytest.approx(expected[0, 1].item())
    assert list(res.top_logprobs[0]) == [1, 2]
    assert res.top_logprobs[1] == {}


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    best = logits.argmax(-1).tolist()
    res = sample(logits, _reqs(*[SamplingParams(temperature=1.0, top_k=1, seed=i) for i in range(2)],
                               *[SamplingParams(temperature=1.0, top_p=1e-6, seed=i) for i in range(2)]))
    assert res.token_ids == best


def test_top_k_never_leaves_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(5).indices.tolist())
    reqs = _reqs(SamplingParams(temperature=2.0, top_k=5, seed=3))
    seen = {sample(logits, reqs).token_ids[0] for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_seeded_requests_repeat_whatever_the_batch():
    logits = torch.randn(3, 1000)
    a = sample(logits[:1], _reqs(SamplingParams(temperature=1.0, seed=42))).token_ids
    b = sample(logits, _reqs(SamplingParams(temperature=1.0, seed=42),
                             SamplingParams(temperature=1.0), SamplingParams(temperature=0.5)))
    assert a[0] == b.token_ids[0]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(max_tokens=0), dict(max_tokens=-3),
                                 dict(logprobs=21), dict(stop=[""])])
def test_bad_sampling_params_name_the_value(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        SamplingParams(**bad)
