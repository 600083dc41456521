"""The simulator against closed forms (M/D/1), hand-computed cases, a step-by-step reference
for the closed-form decode segments, the controller's dispatch rule and its event count."""
import numpy as np
import pytest

from helpers.naive_decode import naive_decode

from distserve.planner.hardware import get_hardware
from distserve.planner.latency import PP_STAGE_MS, InstanceLatency, instance_latency
from distserve.planner.memory import kv_capacity_tokens
from distserve.planner.models import get_model
from distserve.planner.profiles import ProfileEntry
from distserve.planner.search import _ZERO
from distserve.planner.simulator import Colocated, Disaggregated, InstanceConfig, simulate
from distserve.planner.workload import Lengths, Trace, make_trace

ENTRY = ProfileEntry((10.0, 0.1, 1e-4), (20.0, 0.01, 0.5), (30.0, 0.01, 0.2))


def inst(pp=1, capacity=10 ** 9, entry=ENTRY, schedule="synchronous", **kw):
    return InstanceConfig(InstanceLatency(entry, 1, pp, schedule=schedule), capacity, **kw)


def poisson_trace(n, rate, length, seed=0, out=1):
    arr = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
    return Trace(arr - arr[0], np.full(n, length), np.full(n, out))


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.8])
def test_md1_ttft_one_instance(rho):
    """One prefill instance, one fixed-length prompt at a time: avg TTFT = D + RD^2/(2(1-RD))."""
    d_ms = 100.0
    entry = ProfileEntry((d_ms, 0, 0), (1, 0, 0), (1, 0, 0))
    dep = Disaggregated(inst(entry=entry, max_num_batched_tokens=64), _ZERO)
    D = d_ms * 1e-3
    R = rho / D
    means = [simulate(poisson_trace(40000, R, 64, seed), dep).ttft.mean() for seed in range(3)]
    assert np.mean(means) == pytest.approx(D + R * D * D / (2 * (1 - R * D)), rel=0.03 if rho < 0.7 else 0.05)


@pytest.mark.parametrize("rho", [0.3, 0.6])
def test_md1_two_way_pipeline(rho):
    """The artifact's interleaved PP 2, each stage D/2: avg TTFT = D + RD^2 / (4(2 - RD)) (D
    includes the stage constants)."""
    d_ms = 100.0
    entry = ProfileEntry((d_ms, 0, 0), (1, 0, 0), (1, 0, 0))
    dep = Disaggregated(inst(pp=2, entry=entry, max_num_batched_tokens=64, schedule="interleaved"),
                        _ZERO)
    D = 2 * (d_ms / 2 + PP_STAGE_MS * 2) * 1e-3
    R = rho / (D / 2)
    ttft = simulate(poisson_trace(40000, R, 64), dep).ttft.mean()
    assert ttft == pytest.approx(D + R * D * D / (4 * (2 - R * D)), rel=0.03)


@pytest.mark.parametrize("rho", [0.3, 0.6])
def test_md1_synchronous_pipeline(rho):
    """Our engine's PP 2 with one prompt a batch: the prompt passes both stages before the next
    starts, so it is M/D/1 with D = the PP-1 time + one handover."""
    from dataclasses import replace

    from distserve.planner.profiles import PipelineCost
    d_ms, hop_ms = 100.0, 5.0
    entry = ProfileEntry((d_ms, 0, 0), (1, 0, 0), (1, 0, 0))
    one = inst(pp=2, entry=entry, max_num_batched_tokens=64)
    lat = replace(one.latency, prefill_pipe=PipelineCost(1.0, hop_ms, 0.0))
    dep = Disaggregated(replace(one, latency=lat), _ZERO)
    D = (d_ms + hop_ms) * 1e-3
    R = rho / D
    ttft = simulate(poisson_trace(40000, R, 64), dep).ttft.mean()
    assert ttft == pytest.approx(D + R * D * D / (2 * (1 - R * D)), rel=0.03)


def test_synchronous_pipeline_decodes_one_batch_through_the_stages():
    """Two requests decoding together on a PP-2 decode instance: one lane, every step the
    pipelined step of the batch of two (two micro-batches: 1.5 x one micro-batch's step plus
    two handovers), not two lanes of one request each (the interleaved artifact's)."""
    from dataclasses import replace

    from distserve.planner.profiles import PipelineCost
    entry = ProfileEntry((1.0, 0, 0), (20.0, 0.0, 2.0), (20.0, 0.0, 2.0))
    pipe = PipelineCost(1.0, 3.0, 0.5)
    sync = inst(pp=2, entry=entry)
    sync = replace(sync, latency=replace(sync.latency, decode_pipe=pipe))
    trace = Trace(np.zeros(2), np.full(2, 16), np.full(2, 11))
    r = simulate(trace, Disaggregated(inst(entry=entry), sync))
    # the first request's first step runs alone (the second joins at the next boundary): one
    # micro-batch and one handover; then nine steps of two micro-batches of 22 ms each
    alone, two = 22.0 + (3.0 + 0.5), 22.0 * 1.5 + 2 * (3.0 + 0.5)
    assert r.tpot[0] == pytest.approx((alone + 9 * two) / 10 * 1e-3, rel=1e-6)
    assert r.tpot[1] == pytest.approx(two * 1e-3, rel=0.1)
    inter = simulate(trace, Disaggregated(inst(entry=entry), inst(pp=2, entry=entry,
                                                                   schedule="interleaved")))
    assert inter.tpot == pytest.approx([22e-3] * 2, rel=1e-6)   # a lane each, side by side


def test_md1_tensor_parallel_speedup():
    """TP with speedup K: avg TTFT = D/K + RD^2 / (2K(K - RD)), i.e. M/D/1 with D/K."""
    D, K, R = 0.1, 1.6, 10.0
    entry = ProfileEntry((D / K * 1e3, 0, 0), (1, 0, 0), (1, 0, 0))
    dep = Disaggregated(inst(entry=entry, max_num_batched_tokens=64), _ZERO)
    ttft = simulate(poisson_trace(40000, R, 64), dep).ttft.mean()
    assert ttft == pytest.approx(D / K + R * D * D / (2 * K * (K - R * D)), rel=0.03)


def test_one_request_by_hand():
    """TTFT = prefill; TPOT = (KV transfer + the decode steps) / (output - 1)."""
    tr = Trace(np.array([1.0]), np.array([100]), np.array([5]))
    dep = Disaggregated(inst(), inst(), kv_bytes_per_token=1000, link_bandwidth=1e6)
    r = simulate(tr, dep)
    prefill = (10 + 0.1 * 100 + 1e-4 * 100 ** 2) * 1e-3
    steps = sum((20 + 0.01 * (100 + g) + 0.5) * 1e-3 for g in range(1, 5))
    assert r.ttft[0] == pytest.approx(prefill)
    assert r.tpot[0] == pytest.approx((100 * 1000 / 1e6 + steps) / 4)
    col = simulate(tr, Colocated(inst()))
    assert col.ttft[0] == pytest.approx(prefill) and col.tpot[0] == pytest.approx(steps / 4)


def test_a_pull_holds_up_the_decode_step_it_joins():
    """Our engine pulls a request's KV inside the decode step that admits it: every request
    decoding there waits for the pull (1 s here); with overlapped pulls it would not."""
    import math
    tr = Trace(np.array([0.0, 0.05]), np.array([10, 1000]), np.array([60, 5]))

    def run(link, stalls):
        return simulate(tr, Disaggregated(inst(), inst(), kv_bytes_per_token=1000,
                                          link_bandwidth=link, pull_stalls_decode=stalls))

    def last(r):   # when a request's last token came out
        return tr.arrival + r.ttft + r.tpot * (tr.output_len - 1)
    instant, stalled, overlapped = run(math.inf, True), run(1e6, True), run(1e6, False)
    own, other = 10 * 1000 / 1e6, 1000 * 1000 / 1e6
    assert last(stalled)[0] - last(instant)[0] == pytest.approx(own + other)
    assert last(overlapped)[0] - last(instant)[0] < own + 0.1
    assert (stalled.ttft == instant.ttft).all()


def test_closed_form_segments_match_step_by_step():
    rng = np.random.default_rng(3)
    n = 300
    arr = np.sort(rng.uniform(0, 20, n))
    ins, outs = rng.integers(10, 500, n), rng.integers(2, 120, n)
    entry = ProfileEntry((0, 0, 0), (20.0, 0.01, 0.5), (30.0, 0.02, 0.2), threshold=8)
    dep = Disaggregated(_ZERO, inst(entry=entry))
    r = simulate(Trace(arr, ins, outs), dep)
    def coeffs(b):
        return tuple(x * 1e-3 for x in (entry.decode_small if b < 8 else entry.decode_large))
    finish = naive_decode(list(arr), list(ins), list(outs - 1), coeffs)
    np.testing.assert_allclose(r.ttft + arr + r.tpot * (outs - 1), finish, rtol=1e-9, atol=1e-9)


def test_kv_capacity_limits_and_unservable_requests():
    tr = Trace(np.array([0.0, 0.0, 0.0]), np.array([100, 100, 5000]), np.array([50, 50, 10]))
    one_at_a_time = simulate(tr, Disaggregated(inst(), inst(capacity=160)))
    assert not np.isfinite(one_at_a_time.ttft[2])            # 5010 tokens fit no decode instance
    assert one_at_a_time.attainment(10, 10) == pytest.approx(2 / 3)
    # the second request waits for the first to leave the decode instance: twice the TPOT
    assert one_at_a_time.tpot[1] == pytest.approx(2 * one_at_a_time.tpot[0], rel=0.05)


def test_prefill_first_pauses_decoding_and_chunked_prefill_spreads_prompts():
    tr = Trace(np.array([0.0, 0.05]), np.array([100, 2000]), np.array([40, 2]))
    first = simulate(tr, Colocated(inst()))
    alone = simulate(Trace(tr.arrival[:1], tr.input_len[:1], tr.output_len[:1]), Colocated(inst()))
    assert first.tpot[0] > alone.tpot[0]                    # the long prompt stalls the decode
    chunked = simulate(tr, Colocated(inst(max_num_batched_tokens=256), chunked=True))
    assert chunked.tpot[0] < first.tpot[0] and chunked.ttft[1] > first.ttft[1]


def test_more_instances_serve_more():
    lengths = Lengths("sharegpt")
    m, hw = get_model("opt-13b"), get_hardware("a100-80g")
    p = InstanceConfig(instance_latency(m, 2, 1), kv_capacity_tokens(m, hw, 2, 1))
    d = InstanceConfig(instance_latency(m, 1, 1), kv_capacity_tokens(m, hw, 1, 1))
    tr = make_trace(lengths, 2000, 12.0)
    small = simulate(tr, Disaggregated(p, d, 1, 1, m.kv_bytes_per_token, 300e9)).attainment(0.2, 0.1)
    big = simulate(tr, Disaggregated(p, d, 2, 3, m.kv_bytes_per_token, 300e9)).attainment(0.2, 0.1)
    assert big > 0.9 > small


def test_decode_segments_jump_many_tokens_per_event(monkeypatch):
    """The mechanism that keeps the simulator fast: events grow with requests, not tokens."""
    from distserve.planner.simulator import colocated, disaggregated
    events = {"n": 0}
    for cls in (disaggregated._Disaggregated, colocated._Colocated):
        push = cls.push
        def counted(self, *a, _push=push):
            events["n"] += 1
            return _push(self, *a)
        monkeypatch.setattr(cls, "push", counted)
    m, hw = get_model("opt-13b"), get_hardware("a100-80g")
    p = InstanceConfig(instance_latency(m, 2, 1), kv_capacity_tokens(m, hw, 2, 1))
    d = InstanceConfig(instance_latency(m, 1, 1), kv_capacity_tokens(m, hw, 1, 1))
    tr = make_trace(Lengths("sharegpt"), 2000, 5.0)
    tokens = int(tr.output_len.sum())
    for dep in (Disaggregated(p, d, 1, 1, m.kv_bytes_per_token, 300e9), Colocated(d)):
        events["n"] = 0
        assert np.isfinite(simulate(tr, dep).ttft).all()
        assert events["n"] < 6 * len(tr.arrival) < tokens / 10


def test_prompts_go_to_the_prefill_instance_with_the_fewest_queued_tokens():
    """The controller's rule (distserve.dispatch): a long prompt weighs its tokens, so the
    third request joins the short one's instance instead of queueing behind the long one."""
    slow = ProfileEntry((10.0, 1.0, 0.0), (20.0, 0.01, 0.5), (30.0, 0.01, 0.2))
    tr = Trace(np.array([0.0, 0.001, 0.002]), np.array([2000, 10, 10]), np.array([1, 1, 1]))
    r = simulate(tr, Disaggregated(inst(entry=slow), inst(), num_prefill=2))
    long_prefill = (10 + 2000) * 1e-3
    assert r.ttft[0] == pytest.approx(long_prefill)
    assert r.ttft[2] < 0.1 * long_prefill   # behind the short prompt (20 ms), not the long one
