"""Adaptive resources' decision half: the split of a deployment's instances between prefill
and decode scored on a workload (real simulations), and the hysteresis that turns scores into
at most one move."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from distserve.cluster.messages import StepSample
from distserve.planner.adapt import Hysteresis, measured_speed, split_attainments
from distserve.planner.goodput import SLO
from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.models import get_model
from distserve.planner.plan import PhasePlan, Plan
from distserve.planner.search import Problem
from distserve.planner.workload import Lengths

# a one-core CPU instance of SmolLM2 (ms): prefill ~0.5 ms a token, decode ~10 ms a step
ENTRY = {"prefill": [6.8, 0.5, 0.0009], "decoding_smallbs": [10.0, 0.002, 0.3],
         "decoding_largebs": [5.3, 0.002, 0.5], "decoding_large_small_bs_threshold": 32}


@pytest.fixture
def problem(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"_hardware": "cpu", "SmolLM2-135M": {"1": ENTRY}}))
    return Problem(get_model("SmolLM2-135M"), Cluster(get_hardware("cpu"), 1, 4),
                   Lengths("fixed:100:100"), SLO(2.0, 0.05), str(path), jobs=1)


PLAN = Plan("SmolLM2-135M", "cpu", 1, 4, "fixed:100:100", 2.0, 0.05, 0.9, "whole",
            PhasePlan(1, 1, 2), PhasePlan(1, 1, 2), goodput=1.0, goodput_per_gpu=0.25)


def test_long_prompts_want_prefill_instances_and_long_outputs_decode_ones(problem):
    """Prompts of 600 tokens (0.63 s of prefill each) at 3 req/s need three prefill instances;
    outputs of 400 tokens at 8 req/s after short prompts need three decode instances."""
    long_prompts = split_attainments(problem, PLAN, 4, Lengths("fixed:600:8"), 3.0)
    long_outputs = split_attainments(problem, PLAN, 4, Lengths("fixed:16:400"), 8.0)
    assert set(long_prompts) == {1, 2, 3}
    assert max(long_prompts, key=long_prompts.get) == 3
    assert long_prompts[3] > 0.9 > 0.5 > long_prompts[2] > long_prompts[1]
    assert max(long_outputs, key=long_outputs.get) == 1
    assert long_outputs[1] > 0.9 > 0.5 > long_outputs[2] > long_outputs[3]
    observed = Lengths.of_pairs([[600, 8]] * 10)   # what a server observed, as pairs
    assert split_attainments(problem, PLAN, 4, observed, 3.0) == long_prompts
    with pytest.raises(ValueError, match="two instances"):
        split_attainments(problem, PLAN, 1, observed, 3.0)


def test_hysteresis_moves_one_step_after_agreeing_checks_and_not_back_and_forth():
    h = Hysteresis(margin=0.05, patience=2, cooldown_s=60)
    better_prefill = {1: 0.50, 2: 0.70, 3: 0.95}
    assert h.decide(1, better_prefill, now=0) == 0      # one check is not enough
    assert h.decide(1, better_prefill, now=10) == 1     # the second in a row moves one
    assert h.decide(2, better_prefill, now=20) == 0     # cooling down; the streak builds
    assert h.decide(2, better_prefill, now=75) == 1
    # within the margin: stay, and the streak is gone
    close = {1: 0.90, 2: 0.93, 3: 0.92}
    assert h.decide(1, close, now=500) == 0 and h.streak == 0
    # a winner that alternates never builds a streak
    h = Hysteresis(margin=0.05, patience=2, cooldown_s=0)
    a, b = {1: 0.5, 2: 0.6, 3: 0.9}, {1: 0.9, 2: 0.6, 3: 0.5}
    assert [h.decide(2, s, now=t) for t, s in enumerate([a, b, a, b, a, b])] == [0] * 6
    # ties go to the current split
    assert Hysteresis(patience=1, cooldown_s=0).decide(2, {1: 1.0, 2: 1.0, 3: 1.0}, 0) == 0
    # a move that could not be made spends no cooldown; a made one does
    h = Hysteresis(patience=1, cooldown_s=60)
    assert h.decide(1, better_prefill, now=100) == 1
    h.refused()
    assert h.decide(1, better_prefill, now=110) == 1
    assert h.decide(2, better_prefill, now=120) == 0


def test_observed_pairs_are_checked():
    with pytest.raises(ValueError, match="pair"):
        Lengths.of_pairs([])
    with pytest.raises(ValueError, match="pair"):
        Lengths.of_pairs([[0, 5]])


def test_measured_speed_is_the_steps_time_over_the_profiles(problem):
    """Steps reported as a live instance reports them (distserve.cluster.step_samples): decode
    steps 1.5x and prefill steps 0.8x the profile's time give those factors; the factors are
    the machine's, whatever speed the problem already planned at."""
    entry = problem.instance(1, 1).latency.entry

    def decode(batch, k):
        ctx_sum, ctx_max = batch * 150, 300
        return StepSample(k * entry.decode_ms_of(batch, ctx_sum, ctx_max) / 1e3, [], batch,
                          ctx_sum, ctx_max)

    decodes = [decode(b, 1.5) for b in (1, 4, 16, 40) * 6]
    prefills = [StepSample(0.8 * entry.prefill_ms(lens) / 1e3, lens)
                for lens in ([50], [300], [700, 20]) * 8]
    speed = measured_speed(decodes + prefills, problem, PLAN)
    assert speed == pytest.approx({"prefill": 0.8, "decode": 1.5})
    slow = replace(problem, speed={"prefill": 2.0, "decode": 3.0})
    assert measured_speed(decodes + prefills, slow, PLAN) == pytest.approx(speed)
    # a phase with too few steps keeps the speed planned; with none of either: None
    assert measured_speed(decodes + prefills[:4], slow, PLAN) == pytest.approx(
        {"prefill": 2.0, "decode": 1.5})
    assert measured_speed(decodes[:4] + prefills[:4], problem, PLAN) is None


def test_a_slower_decode_than_profiled_keeps_a_decode_instance(problem):
    """Prompts of 400 tokens and 60-token outputs at 4.5 req/s: at the profile's speed a third
    prefill instance wins; where the steps show decode 2x slower than profiled, the one decode
    instance that split leaves cannot hold the TPOT SLO, and two of each win."""
    work = Lengths("fixed:400:60")
    at_profile = split_attainments(problem, PLAN, 4, work, 4.5)
    slow_decode = split_attainments(replace(problem, speed={"prefill": 1.0, "decode": 2.0}),
                                    PLAN, 4, work, 4.5)
    assert max(at_profile, key=at_profile.get) == 3
    assert max(slow_decode, key=slow_decode.get) == 2
    assert slow_decode[3] < 0.5 < 0.9 < at_profile[3]
