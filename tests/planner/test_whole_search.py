"""The whole-deployment search finds what simulating every deployment of the cluster finds
(brute force, on clusters small enough to try them all), and beats the paper's algorithms
where pooling matters."""
import pytest

from distserve.planner.goodput import goodput_one
from distserve.planner.planning import make_plan
from distserve.planner.search import Candidate, deployment
from distserve.planner.simulator import Colocated
from distserve.planner.capacity import instance_capacity
from distserve.planner.whole import (Scored, search_whole,
                                     search_whole_colocated)

from .test_search_plan import problem

SMALL = [  # model, GPUs, workload, TTFT, TPOT: a cluster small enough to try every deployment
    ("facebook/opt-13b", 4, "sharegpt", 0.25, 0.1),
    ("facebook/opt-13b", 4, "fixed:1024:64", 0.6, 0.08),
    ("Qwen/Qwen2.5-7B", 3, "fixed:512:128", 0.3, 0.03),
]


def _every_disaggregated(p):
    options = p.parallelisms(p.cluster.num_gpus, p.cluster.gpus_per_node)
    for kp in options:
        for kd in options:
            for n in range(1, p.cluster.num_gpus + 1):
                for m in range(1, p.cluster.num_gpus + 1):
                    c = Candidate(kp, kd, 1, n, m)
                    if c.num_gpus <= p.cluster.num_gpus:
                        yield c


@pytest.mark.parametrize("model,gpus,workload,ttft,tpot", SMALL)
def test_the_whole_search_finds_the_best_deployment_of_all(model, gpus, workload, ttft, tpot):
    p = problem(model, 1, gpus, workload, ttft, tpot, requests=200)
    link = p.hw.link_bandwidth   # one node: every deployment's KV moves over the in-node link
    brute = {(c.prefill, c.num_prefill, c.decode, c.num_decode):
             goodput_one(deployment(p, c, link), p.lengths, p.slo, p.requests, p.seeds[0])
             for c in _every_disaggregated(p)}
    best_rate = max(brute.values())
    found, _, sims = search_whole(p)
    assert found.goodput >= best_rate * 0.97          # as good as the best (bisection's tolerance)
    assert found.goodput == pytest.approx(
        brute[(found.prefill, found.num_prefill, found.decode, found.num_decode)], rel=0.03)
    assert sims < len(brute)                          # and it did not have to try them all


def test_the_bound_is_never_below_a_simulated_goodput():
    p = problem("facebook/opt-13b", 1, 4, "sharegpt", 0.25, 0.1, requests=200)
    for c in _every_disaggregated(p):
        d = deployment(p, c, p.hw.link_bandwidth)
        rate = goodput_one(d, p.lengths, p.slo, p.requests, p.seeds[0])
        bound = min(c.num_prefill * instance_capacity(d.prefill, p.lengths, "prefill"),
                    c.num_decode * instance_capacity(d.decode, p.lengths, "decode"))
        assert rate <= bound, (c, rate, bound)


@pytest.mark.parametrize("rate", [3.0, 5.0, 10.0])
def test_with_a_target_rate_the_fewest_gpus_that_reach_it(rate):
    p = problem("facebook/opt-13b", 1, 4, "sharegpt", 0.25, 0.1, requests=200)
    reach = [c for c in _every_disaggregated(p)
             if goodput_one(deployment(p, c, p.hw.link_bandwidth), p.lengths, p.slo,
                            p.requests, p.seeds[0], guess=rate) >= rate]
    p.rate = rate
    found, _, _ = search_whole(p)
    assert found.num_gpus == min(c.num_gpus for c in reach) and found.goodput >= rate


def test_the_colocated_search_finds_the_best_replica_count():
    p = problem("facebook/opt-13b", 1, 4, "sharegpt", 0.25, 0.1, requests=200)
    where, rate, _ = search_whole_colocated(p)
    brute = {}
    for tp, pp in p.parallelisms(4, 4):
        for n in range(1, 4 // (tp * pp) + 1):
            brute[(tp, pp, n)] = goodput_one(Colocated(p.colocated_instance(tp, pp), n),
                                             p.lengths, p.slo, p.requests, p.seeds[0])
    assert rate >= max(brute.values()) * 0.97 and where in brute


def test_pooling_beats_the_papers_arithmetic():
    """n instances behind one dispatcher serve more than n times one: on 8 A100s the whole
    search finds more goodput than Algorithm 1's replicated unit (same simulator)."""
    p = problem("facebook/opt-13b", 1, 8, "sharegpt", 0.25, 0.1, requests=300)
    whole = make_plan(p, "whole", compare=False)
    high = make_plan(p, "high", compare=False)
    assert whole.goodput > high.goodput
    assert whole.algorithm == "whole" and whole.simulations > 0


def test_scored_candidates_order_by_estimate_then_gpus():
    a = Scored("a", 4, 2.0, 3.0)
    b = Scored("b", 2, 2.0, 3.0)
    assert sorted([a, b], key=lambda s: (-s.estimate, s.num_gpus))[0] is b
