"""The predicted band around a simulated attainment: the latency fit's band (the exact trace
replayed with steps slower and faster by the fit error) and the seed band (other samples of
the same rate and lengths), on real simulator runs."""
import json

import numpy as np
import pytest

from distserve.planner.calibration import scaled
from distserve.planner.error_bars import (fit_band, fit_error, fit_widths, inside, prediction_band,
                                          resampled, seed_attainments, sim_attainment, speed_spread)
from distserve.planner.latency import InstanceLatency
from distserve.planner.profiles import ProfileEntry
from distserve.planner.simulator import Disaggregated, InstanceConfig

ENTRY = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))


def disagg_at(speed: dict):
    """One prefill and one decode instance, the profile's steps x speed per phase."""
    inst = InstanceConfig(InstanceLatency(scaled(ENTRY, speed["prefill"], speed["decode"])), 10 ** 6,
                          max_batch=256, max_num_batched_tokens=2048)
    return Disaggregated(inst, inst, 1, 1)


def knee(n: int, seed: int = 1):
    """A trace and SLOs at which about half the requests make it: where speed matters most."""
    from distserve.planner.simulator import simulate
    from distserve.planner.workload import Trace
    rng = np.random.default_rng(seed)
    trace = Trace(np.sort(rng.uniform(0, n / 4, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))
    sim = simulate(trace, disagg_at({"prefill": 1.0, "decode": 1.0}))
    return trace, {"ttft": float(np.percentile(sim.ttft, 60)), "tpot": float(np.percentile(sim.tpot, 60))}


def test_a_wider_fit_error_gives_a_wider_fit_band_around_the_point():
    trace, slo = knee(120)
    point = sim_attainment(trace, disagg_at({"prefill": 1.0, "decode": 1.0}), slo)
    narrow = fit_band(trace, disagg_at, None, {"prefill": 0.02, "decode": 0.02}, slo)
    wide = fit_band(trace, disagg_at, None, {"prefill": 0.10, "decode": 0.10}, slo)
    assert wide[0] <= narrow[0] <= point <= narrow[1] <= wide[1]
    assert wide[1] - wide[0] > narrow[1] - narrow[0] > 0
    assert fit_band(trace, disagg_at, None, {"prefill": 0.0, "decode": 0.0}, slo) == [point, point]


def test_the_fit_band_is_taken_around_the_speed_the_prediction_used():
    trace, slo = knee(120)
    slow = {"prefill": 1.2, "decode": 1.2}
    point = sim_attainment(trace, disagg_at(slow), slo)
    band = fit_band(trace, disagg_at, slow, {"prefill": 0.05, "decode": 0.05}, slo)
    assert band[0] <= point <= band[1]
    assert band[1] < sim_attainment(trace, disagg_at({"prefill": 1.0, "decode": 1.0}), slo)


def test_other_samples_of_a_small_trace_spread_its_attainment():
    trace, slo = knee(40)
    again = resampled(trace, 4.0, seed=7)
    assert len(again) == len(trace) and np.all(np.diff(again.arrival) >= 0)
    pairs = set(zip(trace.input_len.tolist(), trace.output_len.tolist()))
    assert set(zip(again.input_len.tolist(), again.output_len.tolist())) <= pairs
    assert np.array_equal(resampled(trace, 4.0, seed=7).arrival, again.arrival)
    by_seed = seed_attainments(trace, disagg_at({"prefill": 1.0, "decode": 1.0}), 4.0, slo, range(5))
    assert len(by_seed) == 5 and max(by_seed) > min(by_seed)


def test_the_predicted_band_spans_the_point_the_fit_band_and_the_seeds():
    trace, slo = knee(60)
    widths = {"prefill": 0.05, "decode": 0.05}
    band = prediction_band(trace, disagg_at, None, widths, 4.0, slo, range(4))
    assert band["point"] == sim_attainment(trace, disagg_at({"prefill": 1.0, "decode": 1.0}), slo)
    assert band["low"] == min(band["point"], band["fit"][0], *band["by_seed"])
    assert band["high"] == max(band["point"], band["fit"][1], *band["by_seed"])
    assert band["seeds"] == [min(band["by_seed"]), max(band["by_seed"])]
    assert inside(band, band["point"]) and inside(band, band["low"]) and inside(band, band["high"])
    assert not inside(band, band["high"] + 0.01) and not inside(band, band["low"] - 0.01)
    no_seeds = prediction_band(trace, disagg_at, None, widths, 4.0, slo, [])
    assert no_seeds["seeds"] is None and [no_seeds["low"], no_seeds["high"]] == [
        min(no_seeds["point"], *no_seeds["fit"]), max(no_seeds["point"], *no_seeds["fit"])]


def test_the_fit_error_comes_from_the_profile_distserve_profile_wrote(tmp_path):
    entry = {"prefill": [6.8, 0.5, 0.0009], "decoding_smallbs": [10.0, 0.002, 0.3],
             "decoding_largebs": [5.3, 0.002, 0.5], "decoding_large_small_bs_threshold": 32}
    with_fit = tmp_path / "fit.json"
    with_fit.write_text(json.dumps({"_hardware": "cpu", "SmolLM2-135M": {"1": entry}, "_fit_error": {
        "SmolLM2-135M": {"prefill": {"mean": 0.022, "max": 0.13}, "decode": {"mean": 0.039, "max": 0.13}}}}))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"_hardware": "cpu", "SmolLM2-135M": {"1": entry}}))
    assert fit_error(str(with_fit), "smollm2-135m") == {"prefill": 0.022, "decode": 0.039}
    assert fit_error(str(with_fit), "another-model") is None
    assert fit_error(str(bare), "SmolLM2-135M") is None
    assert fit_error(str(tmp_path / "missing.json"), "SmolLM2-135M") is None


def test_the_fit_width_is_the_larger_of_the_fit_error_and_the_run_to_run_speed_spread():
    runs = [{"prefill": 1.00, "decode": 1.10}, {"prefill": 1.10, "decode": 1.10}, {"decode": 1.12}]
    spread = speed_spread(runs)
    assert spread["prefill"] == pytest.approx(0.05 / 1.05)
    assert spread["decode"] == pytest.approx(0.01 / np.mean([1.10, 1.10, 1.12]))
    assert speed_spread(runs[:1]) is None and speed_spread([]) is None
    assert speed_spread([{"prefill": 1.0}, {"decode": 1.0}]) is None   # no phase measured twice
    fit = {"prefill": 0.02, "decode": 0.04}
    assert fit_widths(fit, spread) == {"prefill": spread["prefill"], "decode": 0.04}
    assert fit_widths(None, None) == {"prefill": 0.0, "decode": 0.0}
