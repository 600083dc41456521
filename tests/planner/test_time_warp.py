"""The time warp with which benchmarks/sim_vs_real.py replays a run's slow spells (a machine
that runs w times slower for a while passes 1/w of machine time per second then), and its
prediction from a calibration load just before each run."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from sim_vs_real_sim import (TimeWarp, compare, host_slowdown, scaled, sim_deployment, simulate_warped,  # noqa: E402
                             speed_to_match, stats)

from distserve.planner.latency import InstanceLatency, ProfileEntry  # noqa: E402
from distserve.planner.simulator import Disaggregated, InstanceConfig, simulate  # noqa: E402
from distserve.planner.workload import Lengths, Trace  # noqa: E402


def test_warp_maps_wall_to_machine_time_and_back():
    warp = TimeWarp([1.0, 2.0, 0.5], bin_s=1.0)   # then the mean speed after the last bin
    wall = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    machine = warp.to_machine(wall)
    assert machine == pytest.approx([0.0, 0.5, 1.0, 1.25, 1.5, 2.5, 3.5, 4.5])
    assert warp.to_wall(machine) == pytest.approx(wall)


def deployment():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    inst = InstanceConfig(InstanceLatency(entry), 100_000, max_batch=64, max_prefill_tokens=2048)
    return Disaggregated(inst, inst, 1, 1)


def test_a_flat_warp_changes_nothing_and_a_slow_spell_stretches_latencies():
    rng = np.random.default_rng(0)
    trace = Trace(np.sort(rng.uniform(0, 20, 60)), rng.integers(50, 300, 60), rng.integers(2, 80, 60))
    dep = deployment()
    plain = simulate(trace, dep)
    ttft, tpot = simulate_warped(trace, dep, TimeWarp([1.0] * 30, 1.0))
    assert ttft == pytest.approx(plain.ttft) and tpot == pytest.approx(plain.tpot)
    ttft_slow, tpot_slow = simulate_warped(trace, dep, TimeWarp([2.0] * 30, 1.0))
    # twice as slow all along = the same machine serving arrivals half as far apart, with
    # every latency then twice as long in wall time
    dense = simulate(Trace(trace.arrival / 2, trace.input_len, trace.output_len), dep)
    assert ttft_slow == pytest.approx(2 * dense.ttft) and tpot_slow == pytest.approx(2 * dense.tpot)
    assert ttft_slow.mean() > 2 * plain.ttft.mean()   # and denser arrivals queue more


def test_a_run_on_a_machine_twice_as_slow_is_predicted_by_its_calibration_not_by_the_profile():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    rng = np.random.default_rng(1)
    n = 120
    trace = Trace(np.sort(rng.uniform(0, 30, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))
    # "reality": the same deployment on a machine whose steps take twice as long
    slow = simulate(trace, sim_deployment("disagg", scaled(entry, 2.0), 10 ** 6))
    requests = [{"send_time": 100 + float(a), "input_len": int(i), "output_len": int(o),
                 "expected_output_len": int(o), "success": True, "ttft": float(t), "tpot": float(p)}
                for a, i, o, t, p in zip(trace.arrival, trace.input_len, trace.output_len, slow.ttft, slow.tpot)]
    slo = {"ttft": float(np.percentile(slow.ttft, 60)), "tpot": float(np.percentile(slow.tpot, 60))}
    run = {"request_rate": 4.0, "requests": requests,
           "_calibration": {"speed": {"prefill": 2.0, "decode": 2.0}, "requests": 30}}
    doc = {"runs": [run], "_server": {"kv_tokens_per_instance": 10 ** 6}}
    [row] = compare("disagg", doc, entry, slo, Lengths("humaneval-trace"), seeds=1, host_model=False)
    assert row["calibrated"]["diff_pp"] == pytest.approx(0.0)
    assert row["real"]["attainment"] < 0.75 and row["diff_pp"] > 20   # the profile alone: far off


def test_speed_to_match_finds_how_much_slower_the_machine_ran_than_the_simulator_was_told():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    rng = np.random.default_rng(2)
    n = 200
    trace = Trace(np.sort(rng.uniform(0, 40, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))
    told = {"prefill": 1.0, "decode": 1.0}
    reality = simulate(trace, sim_deployment("disagg", scaled(entry, 1.1), 10 ** 6))   # 10% slower
    slo = {"ttft": float(np.percentile(reality.ttft, 50)), "tpot": float(np.percentile(reality.tpot, 50))}
    real = stats(reality.ttft, reality.tpot, slo)["attainment"]
    found = speed_to_match(trace, "disagg", entry, 10 ** 6, told, 0.0, slo, real)
    assert found["factor"] == pytest.approx(1.1, abs=0.015) and found["diff_pp"] <= 100 / n
    assert found["pp_per_pct"] > 0   # slower steps: fewer requests within the SLOs
    same = speed_to_match(trace, "disagg", entry, 10 ** 6, {"prefill": 1.1, "decode": 1.1}, 0.0, slo, real)
    assert same["factor"] == 1.0 and same["diff_pp"] == 0.0


def test_a_repeat_of_the_same_trace_is_compared_with_the_first_run_not_with_the_simulator():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    rng = np.random.default_rng(3)
    n = 120
    trace = Trace(np.sort(rng.uniform(0, 30, n)), rng.integers(50, 300, n), rng.integers(2, 80, n))

    def real_run(k: float) -> dict:   # the deployment on a machine whose steps take k times as long
        sim = simulate(trace, sim_deployment("disagg", scaled(entry, k), 10 ** 6))
        return {"request_rate": 4.0, "requests": [
            {"send_time": 100 + float(a), "input_len": int(i), "output_len": int(o), "expected_output_len": int(o),
             "success": True, "ttft": float(t), "tpot": float(p)}
            for a, i, o, t, p in zip(trace.arrival, trace.input_len, trace.output_len, sim.ttft, sim.tpot)]}

    first, again = real_run(1.0), real_run(1.5)
    first["_repeats"] = [again]
    slo = {"ttft": 0.2, "tpot": 0.035}
    [row] = compare("disagg", {"runs": [first], "_server": {"kv_tokens_per_instance": 10 ** 6}}, entry, slo,
                    Lengths("humaneval-trace"), seeds=1, host_model=False)
    [rep] = row["repeats"]
    a1 = stats(np.array([r["ttft"] for r in first["requests"]]), np.array([r["tpot"] for r in first["requests"]]), slo)
    a2 = stats(np.array([r["ttft"] for r in again["requests"]]), np.array([r["tpot"] for r in again["requests"]]), slo)
    assert rep["real"]["attainment"] == pytest.approx(a2["attainment"])
    assert rep["diff_vs_first_pp"] == pytest.approx(100 * abs(a1["attainment"] - a2["attainment"]))
    assert rep["diff_vs_first_pp"] > 10   # 1.5x slower steps: visibly fewer requests within the SLOs
    assert row["diff_pp"] == pytest.approx(0.0)   # the first run is exactly what the profile predicts
    assert rep["at_run_speed"] is None   # no step traces in these runs: no speed to simulate at


def test_host_work_displaces_the_instances_evenly_and_the_measured_waits_ride_along():
    # 10 s: server + bench used 2 CPU-seconds (H = 0.2 cores); prefill busy 40%, decode 100%
    run = {"duration": 10.0, "_cpu": {"server_s": 1.5, "bench_s": 0.5, "instances_s": [4.0, 10.0],
                                      "instances_wait_s": [0.6, 0.5], "roles": ["prefill", "decode"]}}
    h = host_slowdown(run)
    assert h["host_cores"] == pytest.approx(0.2)
    # each core gives up H / 2 = 0.1 s a second: 0.1 / 0.4 to prefill's steps, 0.1 / 1.0 to decode's
    assert h["k"] == pytest.approx({"prefill": 1.25, "decode": 1.1})
    assert h["k_measured"] == pytest.approx({"prefill": 1.15, "decode": 1.05})
    colocated = {"duration": 10.0, "_cpu": {"server_s": 2.0, "bench_s": 0.0, "instances_s": [5.0, 10.0],
                                            "roles": ["colocated", "colocated"]}}
    k = (1.2 + 1.1) / 2   # each colocated instance runs both phases
    assert host_slowdown(colocated)["k"] == pytest.approx({"prefill": k, "decode": k})
    assert "k_measured" not in host_slowdown(colocated)   # a run recorded before the waits were


def test_measured_interference_stretches_each_role_by_its_host_cost_and_its_busy_neighbour():
    run = {"duration": 10.0, "_cpu": {"server_s": 1.5, "bench_s": 0.5, "instances_s": [4.0, 10.0],
                                      "roles": ["prefill", "decode"]}}
    interference = {"host_cost": {"prefill": {"median": 1.5}, "decode": {"median": 1.0}},
                    "contention": {"prefill": {"prefill": {"median": 1.02}, "decode": {"median": 1.10}},
                                   "decode": {"prefill": {"median": 1.04}, "decode": {"median": 1.30}}}}
    h = host_slowdown(run, interference=interference)
    # host: a prefill step loses 1.5 s per host CPU-second: 1 + 1.5 * 0.1 / 0.4
    assert h["k_host"] == pytest.approx({"prefill": 1.375, "decode": 1.1})
    # neighbour: prefill next to a decode instance busy all the time (x1.10), decode next to a
    # prefill instance busy 40% of it (x1.04 when busy)
    assert h["k_neighbour"] == pytest.approx({"prefill": 1.10, "decode": 1 + 0.04 * 0.4})
    assert h["k"] == pytest.approx({"prefill": 1.375 * 1.10, "decode": 1.1 * 1.016})
    colocated = {"duration": 10.0, "_cpu": {"server_s": 2.0, "bench_s": 0.0, "instances_s": [5.0, 10.0],
                                            "roles": ["colocated", "colocated"]}}
    hc = host_slowdown(colocated, interference=interference)
    # each colocated instance runs both phases next to one that runs both: the victim phase's
    # mean over the neighbour's two (prefill x1.06, decode x1.17 when the neighbour is busy)
    k_prefill = [(1 + 1.5 * 0.1 / 0.5) * (1 + 0.06 * 1.0), (1 + 1.5 * 0.1 / 1.0) * (1 + 0.06 * 0.5)]
    k_decode = [(1 + 1.0 * 0.1 / 0.5) * (1 + 0.17 * 1.0), (1 + 1.0 * 0.1 / 1.0) * (1 + 0.17 * 0.5)]
    assert hc["k"] == pytest.approx({"prefill": sum(k_prefill) / 2, "decode": sum(k_decode) / 2})
    assert host_slowdown(run, interference=None)["k"] == pytest.approx({"prefill": 1.25, "decode": 1.1})
