"""Simulating on a machine whose speed varies: a time warp maps wall time to machine time, so
that a served run's slow spells (seconds during which every step ran slower) are replayed on
every simulated instance at once. The warp comes from the instances' step traces
(distserve.planner.step_traces.speed_timeline).
It must never measure anything or import torch: it maps times and calls the simulator.
"""
from __future__ import annotations

import numpy as np

from distserve.planner.simulator import simulate
from distserve.planner.workload import Trace


class TimeWarp:
    """Wall time <-> machine time for a machine whose speed varies: a bin where steps ran w
    times slower than the mean passes 1/w of machine time per second. Simulating in machine
    time and mapping back replays the run's slow spells on every instance at once."""

    def __init__(self, warp: list[float], bin_s: float) -> None:
        w = np.clip(np.asarray(warp, float), 0.2, 5.0)
        self.bin_s = bin_s
        self.wall = np.arange(len(w) + 1) * bin_s
        self.machine = np.concatenate([[0.0], np.cumsum(bin_s / w)])

    def to_machine(self, t: np.ndarray) -> np.ndarray:
        return self._map(t, self.wall, self.machine)

    def to_wall(self, m: np.ndarray) -> np.ndarray:
        return self._map(m, self.machine, self.wall)

    @staticmethod
    def _map(x, xs, ys):
        x = np.asarray(x, float)
        inside = np.interp(x, xs, ys)
        past = ys[-1] + (x - xs[-1])   # after the last bin: the mean speed
        return np.where(x > xs[-1], past, inside)


def simulate_warped(trace: Trace, dep, warp: TimeWarp):
    """TTFT and TPOT (wall seconds) of `trace` simulated in the warp's machine time."""
    moved = Trace(warp.to_machine(trace.arrival), trace.input_len, trace.output_len)
    sim = simulate(moved, dep)
    out = trace.output_len.astype(float)
    first_m = moved.arrival + sim.ttft
    last_m = first_m + sim.tpot * np.maximum(out - 1, 0)
    first, last = warp.to_wall(first_m), warp.to_wall(last_m)
    ttft = np.where(np.isfinite(sim.ttft), first - trace.arrival, np.inf)
    tpot = np.where(np.isfinite(sim.tpot) & (out > 1), (last - first) / np.maximum(out - 1, 1), sim.tpot)
    return ttft, tpot
