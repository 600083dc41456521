"""Has the served workload moved away from the one its plan was made for?

Two questions, each a bounded statistical test over a window of finished requests, so that
one odd minute never raises an alarm and a real shift always does:
- lengths: a two-sample Kolmogorov-Smirnov test of the observed input and output lengths
  against a large sample of the plan's workload (`Lengths`);
- attainment: a one-sided binomial test of the observed SLO attainment against the plan's
  predicted attainment at the observed arrival rate.
A check that rejects at `alpha` counts towards `consecutive`; the detector says the workload
drifted only after that many checks in a row rejected, each on at least `min_requests`
requests. Pure numpy: the server (no torch) and the planner use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distserve.planner.workload import Lengths


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """sup |F_a - F_b| of the two samples' empirical distributions."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                               - np.searchsorted(b, grid, side="right") / len(b))))


def ks_pvalue(d: float, n: int, m: int) -> float:
    """P(D >= d) for two samples of n and m under the same distribution (Kolmogorov's
    limit with Stephens' small-sample correction)."""
    if d <= 0:
        return 1.0
    ne = n * m / (n + m)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.2:
        return 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, p))


def binomial_below_pvalue(successes: int, n: int, p: float) -> float:
    """P(X <= successes) for X ~ Binomial(n, p): small when the observed share is below p."""
    if n == 0:
        return 1.0
    p = min(max(p, 0.0), 1.0)
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 1.0 if successes >= n else 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(successes + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass
class DriftCheck:
    """One check: its p-values, the means set side by side, and the detector's verdict."""
    requests: int
    input_pvalue: float = 1.0
    output_pvalue: float = 1.0
    attainment_pvalue: float = 1.0
    observed: dict = field(default_factory=dict)   # input/output mean lengths, attainment
    planned: dict = field(default_factory=dict)    # the plan's, at the observed rate
    rejected: list = field(default_factory=list)   # which tests rejected: input, output, attainment
    streak: int = 0                                # checks in a row that rejected
    drifted: bool = False


class DriftDetector:
    def __init__(self, planned: Lengths, alpha: float = 1e-3, min_requests: int = 100,
                 consecutive: int = 3, reference_size: int = 5000, seed: int = 0) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if min_requests < 10 or consecutive < 1:
            raise ValueError(f"min_requests must be >= 10 and consecutive >= 1, got "
                             f"{min_requests} and {consecutive}")
        self.alpha, self.min_requests, self.consecutive = alpha, min_requests, consecutive
        self.planned_input, self.planned_output = planned.sample(reference_size, np.random.default_rng(seed))
        self.streak = 0

    def check(self, input_lens, output_lens, attained: int | None = None,
              predicted_attainment: float | None = None) -> DriftCheck:
        """Tests one window; `attained` of its requests met both SLOs where the plan predicted
        `predicted_attainment` at the observed rate (both None: lengths only)."""
        ins, outs = np.asarray(input_lens), np.asarray(output_lens)
        n = len(ins)
        result = DriftCheck(n, planned={"input_mean": float(self.planned_input.mean()),
                                        "output_mean": float(self.planned_output.mean())})
        if n:
            result.observed = {"input_mean": float(ins.mean()), "output_mean": float(outs.mean())}
        if n < self.min_requests:   # too few to say anything: neither for nor against
            result.streak, result.drifted = self.streak, self.streak >= self.consecutive
            return result
        m = len(self.planned_input)
        result.input_pvalue = ks_pvalue(ks_statistic(ins, self.planned_input), n, m)
        result.output_pvalue = ks_pvalue(ks_statistic(outs, self.planned_output), n, m)
        if attained is not None and predicted_attainment is not None:
            result.observed["attainment"] = attained / n
            result.planned["attainment"] = predicted_attainment
            result.attainment_pvalue = binomial_below_pvalue(attained, n, predicted_attainment)
        result.rejected = [name for name, p in (("input", result.input_pvalue),
                                                ("output", result.output_pvalue),
                                                ("attainment", result.attainment_pvalue))
                           if p < self.alpha]
        self.streak = self.streak + 1 if result.rejected else 0
        result.streak, result.drifted = self.streak, self.streak >= self.consecutive
        return result
