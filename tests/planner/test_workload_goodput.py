"""Synthetic lengths against Table 1, traces, attainment and goodput by bisection."""
import json
import math

import numpy as np
import pytest

from distserve.planner.goodput import SLO, _interpolate, attainment, goodput, goodput_one
from distserve.planner.latency import InstanceLatency
from distserve.planner.profiles import ProfileEntry
from distserve.planner.search import _ZERO
from distserve.planner.simulator import Disaggregated, InstanceConfig
from distserve.planner.workload import Lengths, arrivals, make_trace


@pytest.mark.parametrize("name,mean_in,mean_out", [("sharegpt", 755, 200), ("humaneval", 171, 98),
                                                   ("longbench", 1738, 91)])
def test_synthetic_lengths_match_table_1(name, mean_in, mean_out):
    ins, outs = Lengths(name).sample(50000, np.random.default_rng(5))
    assert ins.mean() == pytest.approx(mean_in, rel=0.03) and outs.mean() == pytest.approx(mean_out, rel=0.03)
    assert ins.min() >= 4 and outs.min() >= 4 and (ins + outs).max() < 2048


def test_fixed_and_file_lengths(tmp_path):
    ins, outs = Lengths("fixed:512:64").sample(10, np.random.default_rng(0))
    assert set(ins) == {512} and set(outs) == {64}
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"prompt_len": i, "output_len": 3}) for i in (10, 20)))
    ins, outs = Lengths(str(path)).sample(100, np.random.default_rng(0))
    assert set(ins) == {10, 20} and set(outs) == {3}
    with pytest.raises(ValueError, match="sharegpt, humaneval, longbench"):
        Lengths("nope")
    with pytest.raises(ValueError, match="fixed:INPUT_LEN:OUTPUT_LEN"):
        Lengths("fixed:1")


def test_arrivals_rate_and_common_requests_across_rates():
    gaps = np.diff(arrivals(100000, 4.0, np.random.default_rng(1)))
    assert gaps.mean() == pytest.approx(0.25, rel=0.02) and gaps.std() == pytest.approx(0.25, rel=0.03)
    bursty = np.diff(arrivals(100000, 4.0, np.random.default_rng(1), burstiness=0.25))
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.05)
    a, b = make_trace(Lengths("sharegpt"), 100, 1.0, 3), make_trace(Lengths("sharegpt"), 100, 2.0, 3)
    assert (a.input_len == b.input_len).all() and np.allclose(a.arrival, 2 * b.arrival)


def test_interpolation_where_the_curve_crosses_the_target():
    assert _interpolate(2.0, 0.95, 3.0, 0.85, 0.9) == pytest.approx(2.5)


def _md1_deployment(d_ms=100.0):
    entry = ProfileEntry((d_ms, 0, 0), (1, 0, 0), (1, 0, 0))
    return Disaggregated(InstanceConfig(InstanceLatency(entry), 10 ** 9, max_num_batched_tokens=64), _ZERO)


def test_goodput_of_md1_matches_its_waiting_time_quantile():
    """M/D/1 with D = 0.1 s and a TTFT SLO of 0.3 s at 90%: the 90th percentile of the response
    time reaches 0.3 s near R = 6 req/s (simulated separately at 20k requests)."""
    slo = SLO(0.3, math.inf, 0.9)
    dep = _md1_deployment()
    g = goodput(dep, Lengths("fixed:64:1"), slo, n=4000, seeds=(0, 1, 2), guess=2.0)
    assert 5.0 < g.rate < 7.0 and len(g.seeds) == 3 and g.spread < 0.5
    assert attainment(dep, Lengths("fixed:64:1"), slo, g.rate * 0.8, 4000) >= 0.9


def test_impossible_slo_gives_zero_goodput():
    assert goodput_one(_md1_deployment(), Lengths("fixed:64:1"), SLO(0.05, 1.0), n=200) == 0.0


def test_bad_slos():
    with pytest.raises(ValueError, match="SLOs must be > 0"):
        SLO(0, 0.1)
    with pytest.raises(ValueError, match="attainment target"):
        SLO(0.1, 0.1, 1.5)
