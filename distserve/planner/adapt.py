"""Adaptive resources (`serve --plan PLAN --adapt`): the split of a deployment's instances
between prefill and decode, re-planned on the workload the server observes.

Every interval the server asks `split_attainments` how each split of its instances (p prefill,
n - p decode, each instance as the plan's) would do on the observed lengths at the observed
rate, simulated on the plan's own latency model at the speed the instances' model steps ran
at in the same window (`measured_speed`: a machine that runs slower than it was profiled,
e.g. more instances than cores, is scored as it runs); `Hysteresis` turns those scores into at
most one move of one instance: only when another split beats the current one by `margin`
points of attainment in `patience` checks in a row, and never within `cooldown_s` of the last
move, so a workload on the edge between two splits does not make the instances flip back
and forth. Pure Python: never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from distserve.planner.planning import planned_deployment
from distserve.planner.reality_check import fresh_attainment
from distserve.planner.search import Problem
from distserve.planner.workload import Lengths

MIN_STEPS = 5       # one-phase steps in the window before that phase's speed is measured
                    # (a prefill step is one prompt: a window at a low rate holds few)
MARGIN = 0.05       # attainment a split must win by
PATIENCE = 2        # checks in a row that must agree
COOLDOWN_S = 60.0   # between two moves
MAX_REQUESTS = 2000  # per simulation of a split: a check's CPU stays bounded at high rates
                    # (the server's checks share its GIL)


def split_attainments(problem: Problem, plan, total: int, lengths: Lengths, rate: float,
                      requests: int = 300, seeds: tuple = (0, 1),
                      horizon_s: float = 0.0) -> dict[int, float]:
    """{prefill instances p: simulated attainment of p prefill + total - p decode instances}
    for every split that keeps one of each, on `lengths` at `rate` (req/s): over `requests`,
    or as many as arrive in `horizon_s` (at most MAX_REQUESTS). An overloaded split's queue
    grows with time: 300 requests at 14 req/s are 21 s of it, where such a split can still
    look fine; the horizon makes it as long as the window the workload was judged on."""
    requests = max(requests, min(MAX_REQUESTS, math.ceil(rate * horizon_s)))
    if plan.mode != "disaggregated" or total < 2:
        raise ValueError("only a disaggregated deployment of two instances or more can move "
                         "instances between prefill and decode")
    base = planned_deployment(problem, plan)
    slo = {"ttft": problem.slo.ttft, "tpot": problem.slo.tpot}
    out = {}
    for p in range(1, total):
        dep = replace(base, num_prefill=p, num_decode=total - p)
        runs = fresh_attainment(dep, lengths, max(rate, 1e-3), requests, slo, seeds)
        out[p] = sum(runs) / len(runs)
    return out


def choose_move(problem: Problem, plan, hysteresis: Hysteresis, prefill: int, total: int,
                pairs, rate: float, now: float, horizon_s: float = 0.0
                ) -> tuple[int, dict[int, float]]:
    """One check on the observed workload (`pairs` of input and output lengths at `rate`):
    the move the hysteresis makes of the splits' scores (+1 one more prefill instance, -1 one
    fewer, 0 none), and the scores (split_attainments over `horizon_s`)."""
    scores = split_attainments(problem, plan, total, Lengths.of_pairs(pairs), rate,
                               horizon_s=horizon_s)
    return hysteresis.decide(prefill, scores, now), scores


def observed_rate(arrivals) -> float:
    """Requests per second between the first and the last of these arrivals (0 if < 2)."""
    arrivals = list(arrivals)
    span = max(arrivals) - min(arrivals) if len(arrivals) >= 2 else 0.0
    return (len(arrivals) - 1) / span if span > 0 else 0.0


def window_check(problem: Problem, plan, hysteresis: Hysteresis, window_s: float,
                 min_observed: int, log: list | None = None):
    """The server's check (server.adaptation) for planner.simulator.adaptive: the lengths of
    the requests that finished in the last `window_s` at the rate of those that arrived in it,
    judged once `min_observed` have finished, at the plan's speed. Appends (time, prefill
    instances, scores, move) to `log`."""
    def check(now: float, prefill: int, total: int, finished, arrivals) -> int:
        rows = finished[finished[:, 0] >= now - window_s]
        rate = observed_rate(arrivals[arrivals >= now - window_s])
        if len(rows) < min_observed or rate <= 0:
            return 0
        pairs = [(int(i), int(o)) for i, o in rows[:, 2:4]]
        move, scores = choose_move(problem, plan, hysteresis, prefill, total, pairs, rate, now,
                                   horizon_s=window_s)
        if log is not None:
            log.append((now, prefill, scores, move))
        return move
    return check


def measured_speed(samples, problem: Problem, plan, min_steps: int = MIN_STEPS) -> dict | None:
    """The speed the instances' model steps ran at, per phase, as factors on the profile's
    times (Problem.speed): their measured time over what the problem's latency model gives the
    same steps, times the speed it already plans at. `samples`: StepSamples
    (distserve.cluster.step_samples). A phase with fewer than `min_steps` keeps the planned
    speed; None where neither phase has them."""
    entries = {"prefill": problem.instance(plan.prefill.tp, plan.prefill.pp).latency.entry,
               "decode": problem.instance(plan.decode.tp, plan.decode.pp).latency.entry}
    sums = {phase: [0, 0.0, 0.0] for phase in entries}   # steps, measured ms, modelled ms
    for s in samples:
        if s.prefill_lens:
            phase, modelled = "prefill", entries["prefill"].prefill_ms(s.prefill_lens)
        elif s.decode_batch:
            phase, modelled = "decode", entries["decode"].decode_ms_of(
                s.decode_batch, s.decode_context_sum, s.decode_context_max)
        else:
            continue
        acc = sums[phase]
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + s.seconds * 1e3, acc[2] + modelled
    if all(n < min_steps for n, _, _ in sums.values()):
        return None
    planned = problem.speed or {}
    return {phase: planned.get(phase, 1.0) * (ms / modelled if n >= min_steps and modelled > 0 else 1.0)
            for phase, (n, ms, modelled) in sums.items()}


@dataclass
class Hysteresis:
    """When to move one instance (see the module's docstring)."""
    margin: float = MARGIN
    patience: int = PATIENCE
    cooldown_s: float = COOLDOWN_S
    target: int | None = None      # the split that has been winning
    streak: int = 0                # checks in a row it won
    last_move: float = -math.inf
    move_before: float = -math.inf  # last_move before the move just decided (refused() puts it back)

    def decide(self, current: int, scores: dict[int, float], now: float) -> int:
        """+1: one more prefill instance (a decode one switches), -1: one fewer, 0: stay.
        `current` is the prefill instances now; `scores` what split_attainments gave."""
        # ties go to the split nearest the current one: no move for nothing
        best = max(scores, key=lambda p: (scores[p], -abs(p - current)))
        if best == current or scores[best] < scores.get(current, 0.0) + self.margin:
            self.target, self.streak = None, 0
            return 0
        self.streak = self.streak + 1 if best == self.target else 1
        self.target = best
        if self.streak < self.patience or now - self.last_move < self.cooldown_s:
            return 0
        self.move_before, self.last_move, self.streak = self.last_move, now, 0
        return 1 if best > current else -1

    def refused(self) -> None:
        """The move just decided could not be made (no instance to spare, or it did not
        drain): its cooldown is not spent."""
        self.last_move = self.move_before
