import pytest
import torch

from distserve.engine.sampler import sample
from distserve.models import paged_kernel
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
    seen = set()
    for _ in range(200):   # each draw at the next position
        token = sample(logits, reqs).token_ids[0]
        reqs[0].append_token(token, None, 0.0)
        seen.add(token)
    assert seen <= allowed and len(seen) > 1


def test_a_seeded_token_depends_on_its_position_not_on_the_draws_before_it():
    """What a re-run or a decode instance relies on: the token at position p of a seeded
    request is the same whether p - 1 tokens were drawn here before it or elsewhere."""
    logits = torch.randn(1, 1000)
    params = SamplingParams(temperature=1.0, seed=11)
    here = _reqs(params)[0]
    draws = []
    for _ in range(6):
        draws.append(sample(logits, [here]).token_ids[0])
        here.append_token(draws[-1], None, 0.0)
    elsewhere = Request("again", [1] + draws[:5], params)
    elsewhere.num_resumed_tokens = 5                  # its first 5 outputs ran before
    assert sample(logits, [elsewhere]).token_ids[0] == draws[5]
    assert len(set(draws)) > 1                        # and positions draw differently


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


@pytest.mark.skipif(not paged_kernel.kernel_available(), reason="no C++ compiler for the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 16, 49, 1000])
def test_argmax_kernel_is_torch_max_first_index_with_ties_and_nans(dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(6, vocab) * 3).round().to(dtype)  # rounded: many ties
    logits[1] = 5.0  # one constant row: index 0
    if vocab > 3:
        logits[2, vocab // 2] = float("nan")  # a NaN wins, as in torch.max
        logits[2, vocab - 1] = float("nan")
        logits[3, vocab - 1] = float("inf")
    got = torch.full((6,), -1, dtype=torch.long)
    torch.ops.distserve_cpu.argmax_rows(got, logits)
    assert got.tolist() == logits.max(dim=-1).indices.tolist()


def test_greedy_sampling_reads_bf16_logits_as_they_are_and_widens_for_logprobs():
    torch.manual_seed(1)
    logits = torch.randn(3, 300).to(torch.bfloat16)
    greedy = sample(logits, _reqs(*[SamplingParams(temperature=0)] * 3))
    assert greedy.token_ids == logits.float().argmax(-1).tolist()
    with_lp = sample(logits, _reqs(*[SamplingParams(temperature=0, logprobs=1)] * 3))
    assert with_lp.token_ids == greedy.token_ids
    expected = torch.log_softmax(logits.float(), -1).max(-1).values.tolist()
    assert with_lp.logprobs == pytest.approx(expected, abs=1e-6)


def test_a_tiny_temperature_is_greedy_not_a_crash():
    """1e-40 in float32 divides logits to inf/NaN; it must sample like temperature 0."""
    torch.manual_seed(1)
    logits = torch.randn(3, 64)
    reqs = _reqs(*[SamplingParams(temperature=t, seed=7) for t in (1e-40, 1e-6, 5e-324)])
    assert all(r.sampling_params.greedy for r in reqs)
    assert sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_a_row_of_nan_logits_fails_no_other_request():
    """Bad numbers in one request's row: that request picks greedily, the batch samples on."""
    torch.manual_seed(2)
    logits = torch.randn(3, 64)
    logits[1] = float("nan")
    logits[2, 5] = float("inf")
    reqs = _reqs(*[SamplingParams(temperature=1.0, seed=i) for i in range(3)])
    res = sample(logits, reqs)
    assert len(res.token_ids) == 3 and all(0 <= t < 64 for t in res.token_ids)
    assert res.token_ids[2] == 5
    alone = sample(logits[:1], _reqs(SamplingParams(temperature=1.0, seed=0)))
    assert res.token_ids[0] == alone.token_ids[0]  # the good row's draw is unchanged


@pytest.mark.parametrize("fields,needle", [
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"seed": 2**63}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"top_k": 2**64}, "top_k"),
    ({"stop_token_ids": [-1]}, "stop token id"), ({"stop_token_ids": [2**70]}, "stop token id"),
    ({"stop_token_ids": list(range(257))}, "stop token ids"),
    ({"stop": ["x"] * 65}, "stop strings"), ({"stop": ["x" * 1025]}, "stop string")])
def test_out_of_range_settings_are_refused_by_name(fields, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**fields)


def test_the_extreme_valid_settings_are_accepted():
    for fields in ({"seed": 2**63 - 1}, {"seed": -2**63}, {"top_k": 2**31 - 1},
                   {"stop_token_ids": [0, 2**31 - 1]}, {"stop": ["x" * 1024] * 64}):
        SamplingParams(**fields)


def test_a_row_whose_sampling_raises_fails_alone(monkeypatch):
    """Whatever breaks one request's sampling (injected: every setting that could is refused
    at admission) is that request's error; the batch's other rows get their tokens."""
    from distserve.engine import sampler
    real = sampler._filtered_probs

    def flaky(logits, params):
        if any(p.top_k == 7 for p in params):
            raise RuntimeError("injected")
        return real(logits, params)
    monkeypatch.setattr(sampler, "_filtered_probs", flaky)
    logits = torch.randn(3, 100)
    good = SamplingParams(temperature=1.0, seed=5)
    alone = sample(logits[:1], _reqs(good)).token_ids[0]
    res = sample(logits, _reqs(good, SamplingParams(temperature=1.0, top_k=7),
                               SamplingParams(temperature=0)))
    assert res.errors == {1: "RuntimeError: injected"}
    assert res.token_ids[0] == alone and res.token_ids[2] == int(logits[2].argmax())
