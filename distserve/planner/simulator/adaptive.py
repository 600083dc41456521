"""A disaggregated deployment whose instances change role during the run, in the simulator:
what `serve --plan --adapt` does over a whole trace, at any scale.

The deployment starts with `prefill` of its instances in prefill and the rest in decode (each
as the Disaggregated's prefill or decode instance). Every `interval_s` of simulated time,
`check(now, prefill, total, finished, arrivals)` is asked for a move, as the server asks its
adaptation: `finished` holds the requests done so far as rows (finish, arrival, input,
output), `arrivals` the arrival times of all requests so far, done or not; +1 moves
a decode instance to prefill, -1 the other way. The moved instance is the one of its role
with the least work (Controller.switch_candidate); it takes no new request, finishes what
it holds (a prefill instance: until its KV is pulled), then serves in its new role after
`switch_s` (the engine rebuilt over the loaded model). The last instance of a role never
moves, and only one-worker instances move (as `serve --adapt` makes only those switchable).
Never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from distserve.planner.simulator.common import INF, SimResult, result
from distserve.planner.simulator.disaggregated import Disaggregated, _Disaggregated
from distserve.planner.workload import Trace

CHECK, SWITCHED = 10, 11
Check = Callable[[float, int, int, np.ndarray, np.ndarray], int]


@dataclass
class RoleSwitch:
    decided: float        # when the check asked for it (s into the trace)
    done: float           # when the instance served in its new role
    instance: int
    role: str             # the new role


@dataclass
class AdaptiveResult:
    result: SimResult
    switches: list[RoleSwitch] = field(default_factory=list)


def simulate_adaptive(trace: Trace, d: Disaggregated, check: Check, interval_s: float,
                      switch_s: float = 0.0) -> AdaptiveResult:
    """`trace` served by d.num_prefill + d.num_decode instances that `check` may move."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    if any(c.latency.tp * c.latency.pp != 1 for c in (d.prefill, d.decode)):
        raise ValueError("only one-worker instances (TP 1, PP 1) change role, as in the server")
    sim = _Adaptive(trace, d, check, interval_s, switch_s)
    return AdaptiveResult(sim.run(), sim.switches)


class _Adaptive(_Disaggregated):
    def __init__(self, trace: Trace, d: Disaggregated, check: Check, interval_s: float,
                 switch_s: float) -> None:
        n = d.num_prefill + d.num_decode
        # every instance gets both roles' state; `role` says which one it serves in
        super().__init__(trace, replace(d, num_prefill=n, num_decode=n))
        self.role = ["prefill"] * d.num_prefill + ["decode"] * d.num_decode
        self.leaving: list[str | None] = [None] * n     # the role a draining instance goes to
        self.scheduled = [False] * n                     # drained: its SWITCHED event is queued
        self.record: list[int] = [0] * n                 # its entry in self.switches
        self.check, self.interval_s, self.switch_s = check, interval_s, switch_s
        self.switches: list[RoleSwitch] = []
        # the trace as arrays once: each check selects the finished rows from them
        self.arrivals = np.asarray(trace.arrival, float)
        self.lengths = np.column_stack([trace.input_len, trace.output_len])
        self.end = float(self.arr[-1]) if self.arr else 0.0
        if interval_s <= self.end:
            self.push(interval_s, CHECK, None, None)

    def serving(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.role) if r == role and self.leaving[i] is None]

    def pick_prefill(self) -> int:
        return min(self.serving("prefill"), key=self.pqueued.__getitem__)

    def pick_decode(self) -> int:
        return min(self.serving("decode"), key=self.dload.__getitem__)

    def other_event(self, now: float, kind: int, x, y) -> None:
        if kind == SWITCHED:
            self.role[x], self.leaving[x], self.scheduled[x] = self.leaving[x], None, False
            self.switches[y].done = now
            if self.role[x] == "prefill":
                self.start_prefill(x, now)
            return
        # CHECK: the requests finished by now, as the server's window would see them
        last, arr = np.array(self.last), self.arrivals
        done = np.flatnonzero(last <= now)
        rows = np.column_stack([last[done], arr[done], self.lengths[done]])
        counted = [self.leaving[i] or self.role[i] for i in range(len(self.role))]
        arrived = arr[:np.searchsorted(arr, now, side="right")]
        move = self.check(now, counted.count("prefill"), len(counted), rows, arrived)
        if move:
            self.start_switch(now, "prefill" if move > 0 else "decode")
        if now + self.interval_s <= self.end:
            self.push(now + self.interval_s, CHECK, None, None)

    def start_switch(self, now: float, new: str) -> None:
        old = "decode" if new == "prefill" else "prefill"
        pool = self.serving(old)
        if len(pool) < 2:
            return   # the last instance of a role never moves
        work = (lambda i: (self.pqueued[i], self.pkv[i])) if old == "prefill" else self.dload.__getitem__
        i = min(pool, key=work)
        self.leaving[i], self.record[i] = new, len(self.switches)
        self.switches.append(RoleSwitch(now, INF, i, new))
        self.maybe_switch(i, now)

    def maybe_switch(self, i: int, now: float) -> None:
        """Starts the role change of draining instance i once it holds nothing."""
        if self.leaving[i] is None or self.scheduled[i]:
            return
        if self.role[i] == "prefill":
            idle = not self.pq[i] and not self.pbusy[i] and self.pkv[i] == 0
        else:
            idle = self.dload[i] == 0
        if idle:
            self.scheduled[i] = True
            self.push(now + self.switch_s, SWITCHED, i, self.record[i])

    # the base class's events, each followed by a look at a draining instance
    def prefilled(self, j: int, batch: list, now: float) -> None:
        super().prefilled(j, batch, now)
        self.maybe_switch(j, now)

    def transferred(self, k: int, r: int, now: float) -> None:
        super().transferred(k, r, now)
        self.maybe_switch(self.src[r], now)

    def boundary(self, k: int, lane, now: float) -> None:
        super().boundary(k, lane, now)
        self.maybe_switch(k, now)
