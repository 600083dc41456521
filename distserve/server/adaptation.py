"""`serve --plan PLAN --adapt`: the running deployment follows its workload.

Every `interval_s` the server takes what it observed in the last `window_s` (the plan
monitor's lengths and arrival rate of the requests that finished then), scores every split of
its instances between prefill and decode on the plan's latency model
(planner.adapt.choose_move, in a thread: simulations never run on the server's loop)
at the speed the instances' model steps ran in the same window (planner.adapt.measured_speed),
and, when the hysteresis says so, switches one instance in place
(Controller.switch_role: drained, role changed, model kept loaded). /metrics counts the
switches (role_switches). Imports no torch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from distserve.planner.adapt import Hysteresis, choose_move, measured_speed

log = logging.getLogger(__name__)
MIN_OBSERVED = 20     # finished requests in the window before the workload is judged at all


class Adaptation:
    def __init__(self, controller, monitor, problem, plan, interval_s: float = 30.0,
                 hysteresis: Hysteresis | None = None, min_observed: int = MIN_OBSERVED,
                 window_s: float = 120.0, measure_speed: bool = True) -> None:
        self.controller, self.monitor = controller, monitor
        self.problem, self.plan = problem, plan
        self.interval_s, self.window_s = interval_s, window_s
        self.measure_speed = measure_speed   # False: score at the profile's speed
        self.hysteresis = hysteresis or Hysteresis()
        self.min_observed = min_observed
        self.last_scores: dict[int, float] = {}
        self.last_speed: dict | None = None   # the steps' speed x the profile it scored at
        self.checks = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:   # a failed check must not end the server
                log.exception("an adaptation check failed")

    async def check(self, now: float | None = None) -> int:
        """One look at the observed workload; returns the move made (+1 one more prefill
        instance, -1 one fewer, 0 none)."""
        pairs, rate = self.monitor.recent_workload(self.window_s, now)
        if len(pairs) < self.min_observed or rate <= 0:
            return 0
        roles = self.controller.roles()
        prefill, total = roles.get("prefill", 0), roles.get("prefill", 0) + roles.get("decode", 0)
        clock = time.monotonic() if now is None else now
        if self.measure_speed:
            self.last_speed = measured_speed(self.controller.recent_steps(clock - self.window_s),
                                             self.problem, self.plan)
            self.monitor.model_speed = self.last_speed
        problem = self.problem if self.last_speed is None else replace(self.problem, speed=self.last_speed)
        move, self.last_scores = await asyncio.to_thread(
            choose_move, problem, self.plan, self.hysteresis, prefill, total, pairs, rate, clock,
            self.window_s)
        self.checks += 1
        if move:
            old, new = ("decode", "prefill") if move > 0 else ("prefill", "decode")
            iid = self.controller.switch_candidate(old)
            if iid is None:
                self.hysteresis.refused()
                return 0
            log.warning("the observed workload (%.3g req/s) is served best by %d prefill + %d "
                        "decode instances (%s; %s): %s becomes a %s instance", rate, prefill + move,
                        total - prefill - move, _fmt(self.last_scores), _fmt_speed(self.last_speed),
                        iid, new)
            try:
                await self.controller.switch_role(iid, new)
            except (ValueError, TimeoutError) as e:
                log.warning("%s stays %s: %s", iid, old, e)
                self.hysteresis.refused()
                return 0
        return move


def _fmt_speed(speed: dict | None) -> str:
    if speed is None:
        return "at the profile's speed"
    return "model steps at " + ", ".join(f"{k:.2f}x the profile's time ({phase})" for phase, k in speed.items())


def _fmt(scores: dict[int, float]) -> str:
    return ", ".join(f"{p}P: {100 * a:.0f}%" for p, a in sorted(scores.items()))
