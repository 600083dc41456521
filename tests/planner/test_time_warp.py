"""The time warp with which a served run's slow spells are replayed (a machine that runs w
times slower for a while passes 1/w of machine time per second then)."""
import numpy as np
import pytest

from distserve.planner.latency import InstanceLatency
from distserve.planner.profiles import ProfileEntry
from distserve.planner.simulator import Disaggregated, InstanceConfig, simulate
from distserve.planner.time_warp import TimeWarp, simulate_warped
from distserve.planner.workload import Trace


def test_warp_maps_wall_to_machine_time_and_back():
    warp = TimeWarp([1.0, 2.0, 0.5], bin_s=1.0)   # then the mean speed after the last bin
    wall = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    machine = warp.to_machine(wall)
    assert machine == pytest.approx([0.0, 0.5, 1.0, 1.25, 1.5, 2.5, 3.5, 4.5])
    assert warp.to_wall(machine) == pytest.approx(wall)


def deployment():
    entry = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))
    inst = InstanceConfig(InstanceLatency(entry), 100_000, max_batch=64, max_num_batched_tokens=2048)
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
