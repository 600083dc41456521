"""The host model: how much the host processes and a neighbour instance stretch an instance's
steps, from a run's CPU accounting and the measured interference."""
import pytest

from distserve.planner.host_model import host_slowdown


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
