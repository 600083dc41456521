"""A served run against the simulation of its own arrivals and lengths: its prediction from a
calibration load just before the run, the speed error that would explain a difference, and
a repeat of the same trace compared with the first run."""
import numpy as np
import pytest

from distserve.planner.calibration import scaled
from distserve.planner.latency import InstanceLatency
from distserve.planner.profiles import ProfileEntry
from distserve.planner.reality_check import compare, speed_to_match, stats
from distserve.planner.simulator import Disaggregated, InstanceConfig, simulate
from distserve.planner.workload import Lengths, Trace


def disagg(entry):
    """One prefill and one decode instance with the server's batching limits."""
    inst = InstanceConfig(InstanceLatency(entry), 10 ** 6, max_batch=256, max_num_batched_tokens=2048)
    return Disaggregated(inst, inst, 1, 1)


def test_a_run_on_a_machine_twice_as_slow_is_predicted_by_its_calibration_not_by_the_profile():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    rng = np.random.default_rng(1)
    n = 120
    trace = Trace(np.sort(rng.uniform(0, 30, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))
    # "reality": the same deployment on a machine whose steps take twice as long
    slow = simulate(trace, disagg(scaled(entry, 2.0)))
    requests = [{"send_time": 100 + float(a), "input_len": int(i), "output_len": int(o),
                 "expected_output_len": int(o), "success": True, "ttft": float(t), "tpot": float(p)}
                for a, i, o, t, p in zip(trace.arrival, trace.input_len, trace.output_len, slow.ttft, slow.tpot)]
    slo = {"ttft": float(np.percentile(slow.ttft, 60)), "tpot": float(np.percentile(slow.tpot, 60))}
    run = {"request_rate": 4.0, "requests": requests,
           "_calibration": {"speed": {"prefill": 2.0, "decode": 2.0}, "requests": 30}}
    doc = {"runs": [run], "_server": {"kv_tokens_per_instance": 10 ** 6}}
    [row] = compare(disagg, doc, entry, slo, Lengths("humaneval-trace"), seeds=1, host_model=False)
    assert row["calibrated"]["diff_pp"] == pytest.approx(0.0)
    assert row["real"]["attainment"] < 0.75 and row["diff_pp"] > 20   # the profile alone: far off


def test_speed_to_match_finds_how_much_slower_the_machine_ran_than_the_simulator_was_told():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    rng = np.random.default_rng(2)
    n = 200
    trace = Trace(np.sort(rng.uniform(0, 40, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))
    told = {"prefill": 1.0, "decode": 1.0}
    reality = simulate(trace, disagg(scaled(entry, 1.1)))   # 10% slower
    slo = {"ttft": float(np.percentile(reality.ttft, 50)), "tpot": float(np.percentile(reality.tpot, 50))}
    real = stats(reality.ttft, reality.tpot, slo)["attainment"]
    found = speed_to_match(trace, disagg, entry, told, 0.0, slo, real)
    assert found["factor"] == pytest.approx(1.1, abs=0.015) and found["diff_pp"] <= 100 / n
    assert found["pp_per_pct"] > 0   # slower steps: fewer requests within the SLOs
    same = speed_to_match(trace, disagg, entry, {"prefill": 1.1, "decode": 1.1}, 0.0, slo, real)
    assert same["factor"] == 1.0 and same["diff_pp"] == 0.0


def test_a_repeat_of_the_same_trace_is_compared_with_the_first_run_not_with_the_simulator():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    rng = np.random.default_rng(3)
    n = 120
    trace = Trace(np.sort(rng.uniform(0, 30, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))

    def real_run(k: float) -> dict:   # the deployment on a machine whose steps take k times as long
        sim = simulate(trace, disagg(scaled(entry, k)))
        return {"request_rate": 4.0, "requests": [
            {"send_time": 100 + float(a), "input_len": int(i), "output_len": int(o), "expected_output_len": int(o),
             "success": True, "ttft": float(t), "tpot": float(p)}
            for a, i, o, t, p in zip(trace.arrival, trace.input_len, trace.output_len, sim.ttft, sim.tpot)]}

    first, again = real_run(1.0), real_run(1.5)
    first["_repeats"] = [again]
    slo = {"ttft": 0.2, "tpot": 0.035}
    [row] = compare(disagg, {"runs": [first], "_server": {"kv_tokens_per_instance": 10 ** 6}}, entry, slo,
                    Lengths("humaneval-trace"), seeds=1, host_model=False)
    [rep] = row["repeats"]
    a1 = stats(np.array([r["ttft"] for r in first["requests"]]), np.array([r["tpot"] for r in first["requests"]]), slo)
    a2 = stats(np.array([r["ttft"] for r in again["requests"]]), np.array([r["tpot"] for r in again["requests"]]), slo)
    assert rep["real"]["attainment"] == pytest.approx(a2["attainment"])
    assert rep["diff_vs_first_pp"] == pytest.approx(100 * abs(a1["attainment"] - a2["attainment"]))
    assert rep["diff_vs_first_pp"] > 10   # 1.5x slower steps: visibly fewer requests within the SLOs
    assert row["diff_pp"] == pytest.approx(0.0)   # the first run is exactly what the profile predicts
    assert rep["at_run_speed"] is None   # no step traces in these runs: no speed to simulate at
