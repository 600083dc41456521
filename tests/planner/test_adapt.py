"""Adaptive resources' decision half: the split of a deployment's instances between prefill
and decode scored on a workload (real simulations), and the hysteresis that turns scores into
at most one move."""
from __future__ import annotations

import json

import pytest

from distserve.planner.adapt import Hysteresis, split_attainments
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


def test_observed_pairs_are_checked():
    with pytest.raises(ValueError, match="pair"):
        Lengths.of_pairs([])
    with pytest.raises(ValueError, match="pair"):
        Lengths.of_pairs([[0, 5]])
