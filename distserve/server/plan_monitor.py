"""The plan a server runs (`serve --plan`), set against what the server observes.

Every finished request is recorded (its arrival, lengths and whether it met both SLOs). Each
batch of `min_requests` fresh requests is one check of planner.drift.DriftDetector: their
lengths against the plan's workload, and their attainment against the plan's predicted
attainment at the rate they arrived at (simulated with the planner's own deployment model).
Batches never overlap, so a drift needs `consecutive` bad batches in a row, never one bad
minute seen three times. /metrics shows the last check; GET /v1/observed_workload hands the
recent lengths and rate to `distserve plan --from-metrics`. Imports no torch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from distserve.planner.adapt import observed_rate
from distserve.planner.drift import DriftCheck, DriftDetector
from distserve.planner.workload import Lengths

log = logging.getLogger(__name__)


def plan_problem(plan, requests: int = 300, seeds: tuple = (0, 1)):
    """The planner's problem a plan was made for (its model, hardware, workload, SLOs and
    latency profile), to simulate it here. Raises ValueError where it cannot be (its model
    or latency profile is not on this machine)."""
    from distserve.planner.goodput import SLO
    from distserve.planner.hardware import Cluster, get_hardware
    from distserve.planner.models import get_model
    from distserve.planner.search import Problem
    return Problem(get_model(plan.model), Cluster(get_hardware(plan.hardware), plan.nodes,
                                                  plan.gpus_per_node),
                   Lengths(plan.workload), SLO(plan.ttft_slo, plan.tpot_slo, plan.attainment_target),
                   (plan.latency_source or {}).get("profile") or "distserve",
                   requests=requests, seeds=seeds, jobs=1)


def plan_predictor(plan, requests: int = 300, seeds: tuple = (0, 1)) -> Callable[[float], float]:
    """rate -> the plan's simulated attainment at that rate, on its own workload and SLOs.
    Raises ValueError where the plan cannot be simulated here."""
    from distserve.planner.planning import planned_deployment
    from distserve.planner.reality_check import fresh_attainment
    problem = plan_problem(plan, requests, seeds)
    lengths = problem.lengths
    dep = planned_deployment(problem, plan)
    slo = {"ttft": plan.ttft_slo, "tpot": plan.tpot_slo}
    cache: dict[float, float] = {}

    def predict(rate: float) -> float:
        key = float(f"{rate:.2g}")   # two significant digits: a simulation per rate seen
        if key not in cache:
            runs = fresh_attainment(dep, lengths, max(key, 1e-3), requests, slo, seeds)
            cache[key] = sum(runs) / len(runs)
        return cache[key]
    return predict


class PlanMonitor:
    def __init__(self, plan, predictor: Callable[[float], float] | None = None,
                 window_s: float = 300.0, min_requests: int = 100, consecutive: int = 3,
                 alpha: float = 1e-3) -> None:
        self.plan = plan
        self.predictor = predictor
        self.window_s = window_s
        self.detector = DriftDetector(Lengths(plan.workload), alpha, min_requests, consecutive)
        self._recent: deque = deque(maxlen=5000)   # (finish, arrival, input, output, met)
        self._arrivals: deque = deque(maxlen=20000)   # when each request arrived, done or not
        self._batch: list = []
        self._lock = threading.Lock()
        # a check may simulate the plan (tens of ms to seconds): never on the server's loop
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="plan-monitor")
        self._checking = False
        self.last: DriftCheck | None = None
        self.drifts = 0            # times the detector turned to "drifted"
        self.checks = 0
        # {phase: model steps' time / the plan's profile} at --adapt's last check, if measured
        self.model_speed: dict | None = None

    def arrived(self, at: float | None = None) -> None:
        """A request arrived (time.monotonic()): the arrival rate counts it before it finishes."""
        self._arrivals.append(time.monotonic() if at is None else at)

    def record(self, arrival: float, finish: float, input_len: int, output_len: int,
               met_both: bool) -> None:
        row = (finish, arrival, input_len, output_len, met_both)
        self._recent.append(row)
        with self._lock:
            self._batch.append(row)
            start = len(self._batch) >= self.detector.min_requests and not self._checking
            self._checking = self._checking or start
        if start:
            self._checker.submit(self._evaluate_in_background)

    def _evaluate_in_background(self) -> None:
        """Checks every full batch there is; requests recorded meanwhile make the next ones."""
        try:
            while self.evaluate() is not None:
                pass
        except Exception:
            log.exception("a drift check failed")
        finally:
            with self._lock:   # a batch filled since the last look is checked too
                self._checking = len(self._batch) >= self.detector.min_requests
                again = self._checking
            if again:
                self._checker.submit(self._evaluate_in_background)

    def close(self) -> None:
        self._checker.shutdown(wait=False, cancel_futures=True)

    def arrival_rate(self, now: float | None = None) -> float:
        """Requests per second that finished in the last window_s (= arriving, in a steady state)."""
        now = time.monotonic() if now is None else now
        return observed_rate([r[1] for r in self._recent if r[0] >= now - self.window_s])

    def recent_workload(self, window_s: float, now: float | None = None
                        ) -> tuple[list[tuple[int, int]], float]:
        """(input, output) lengths of the requests that finished in the last window_s, and the
        arrival rate of those that arrived in it: the workload as it is now, not as it was
        minutes ago (adaptation must see a shift within a window, however long the server has
        run before it). The rate counts requests still queued: under overload the finished
        ones arrive slower than requests do (their arrivals spread wider than the window:
        they finish out of order), so a rate from them would hide the overload."""
        now = time.monotonic() if now is None else now
        rows = [r for r in self._recent if r[0] >= now - window_s]
        if self._arrivals:
            arrivals = [a for a in self._arrivals if now - window_s <= a <= now]
        else:   # no arrival ever noted (rows recorded by hand): the finished ones'
            arrivals = [r[1] for r in rows]
        return [(r[2], r[3]) for r in rows], observed_rate(arrivals)

    def evaluate(self) -> DriftCheck | None:
        """Checks the oldest `min_requests` fresh requests if there are that many (a batch
        never takes the requests of the next); returns the check (or None)."""
        n = self.detector.min_requests
        with self._lock:
            if len(self._batch) < n:
                return None
            batch, self._batch = self._batch[:n], self._batch[n:]
        rate = observed_rate([r[1] for r in batch])
        predicted = None
        if self.predictor is not None and rate > 0:
            try:
                predicted = self.predictor(rate)
            except Exception:   # a simulation that fails must not end the server
                log.exception("the plan's predicted attainment could not be simulated")
                self.predictor = None
        was = self.last is not None and self.last.drifted
        check = self.detector.check([r[2] for r in batch], [r[3] for r in batch],
                                    sum(1 for r in batch if r[4]), predicted)
        check.observed["arrival_rate"] = rate
        self.last, self.checks = check, self.checks + 1
        if check.drifted and not was:
            self.drifts += 1
            log.warning("the workload has drifted from the plan (%d checks in a row: %s): "
                        "observed %s, planned %s; re-plan with `distserve plan --from-metrics "
                        "URL`", check.streak, ", ".join(check.rejected) or "-",
                        _fmt(check.observed), _fmt(check.planned))
        return check

    def observed_workload(self) -> dict:
        """What `distserve plan --from-metrics` plans from."""
        return {"model": self.plan.model, "planned_workload": self.plan.workload,
                "ttft_slo": self.plan.ttft_slo, "tpot_slo": self.plan.tpot_slo,
                "window_s": self.window_s, "arrival_rate": self.arrival_rate(),
                "lengths": [[r[2], r[3]] for r in self._recent]}


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in d.items())
