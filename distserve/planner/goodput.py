"""SLO attainment at a rate, and goodput: the highest rate whose attainment reaches the target.

Goodput is found by doubling the rate until attainment falls below the target, then
bisecting; between the last passing and the first failing rate it is interpolated linearly
where the attainment curve crosses the target (the reference's definition). Every rate of one
search replays the same requests (same seed), only compressed in time, so the curve is smooth;
at high rates the trace grows (same requests first) so that it spans several request
lifetimes: a trace that ends before its first requests finish measures a burst, not a rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distserve.planner.simulator import simulate
from distserve.planner.workload import Lengths, make_trace

DEFAULT_REQUESTS = 2000
HORIZONS = 4        # a trace spans at least this many request lifetimes ...
MAX_GROWTH = 10     # ... growing up to this many times the requested size


@dataclass(frozen=True)
class SLO:
    ttft: float                 # seconds
    tpot: float                 # seconds
    target: float = 0.9         # attainment to reach

    def __post_init__(self) -> None:
        if self.ttft <= 0 or self.tpot <= 0:
            raise ValueError(f"SLOs must be > 0 seconds, got TTFT {self.ttft} and TPOT {self.tpot}")
        if not 0 < self.target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.target}")


@dataclass
class Goodput:
    rate: float                                     # req/s of the whole deployment
    seeds: list = field(default_factory=list)       # per-seed rates
    probes: list = field(default_factory=list)      # (rate, attainment) simulated, first seed

    @property
    def spread(self) -> float:
        return float(np.std(self.seeds)) if len(self.seeds) > 1 else 0.0


def attainment(deployment, lengths: Lengths, slo: SLO, rate: float, n: int = DEFAULT_REQUESTS,
               seed: int = 0, burstiness: float = 1.0) -> float:
    return simulate(make_trace(lengths, n, rate, seed, burstiness), deployment).attainment(slo.ttft, slo.tpot)


def goodput_one(deployment, lengths: Lengths, slo: SLO, n: int = DEFAULT_REQUESTS, seed: int = 0,
                guess: float = 1.0, rel_tol: float = 0.02, burstiness: float = 1.0,
                probes: list | None = None) -> float:
    """Highest rate (req/s) with attainment >= target for one seed; 0 when even 1/256 of
    `guess` fails (the SLO cannot be met, queueing or not). Never above what the deployment
    can process at all (capacity.py): with SLOs so loose that no finite trace breaks them,
    that capacity is the answer."""
    from distserve.planner.capacity import deployment_capacity
    horizon = _lifetime(lengths, slo)
    ceiling = deployment_capacity(deployment, lengths)
    guess = min(guess, ceiling) if math.isfinite(ceiling) and ceiling > 0 else guess

    def att(rate: float) -> float:
        # a trace shorter than a few request lifetimes is one burst, not a steady load
        size = int(min(max(n, math.ceil(HORIZONS * rate * horizon)), MAX_GROWTH * n))
        a = attainment(deployment, lengths, slo, rate, size, seed, burstiness)
        if probes is not None:
            probes.append((rate, a))
        return a

    lo, a_lo, hi, a_hi = 0.0, 1.0, None, None
    rate = max(guess, 1e-6)
    for _ in range(40):                      # bracket: grow until it fails, shrink until it passes
        a = att(rate)
        if a >= slo.target:
            lo, a_lo = rate, a
            if hi is not None:
                break
            if rate >= ceiling:              # it meets the SLOs at all it can process
                return ceiling
            rate = min(rate * 2.0, ceiling)
        else:
            hi, a_hi = rate, a
            if lo > 0 or rate < guess / 256:
                break
            rate /= 2.0
    if hi is None:
        return math.inf
    if lo == 0.0:
        return 0.0
    while (hi - lo) > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        a = att(mid)
        if a >= slo.target:
            lo, a_lo = mid, a
        else:
            hi, a_hi = mid, a
    return _interpolate(lo, a_lo, hi, a_hi, slo.target)


def _lifetime(lengths: Lengths, slo: SLO) -> float:
    """Seconds a request may live while meeting its SLOs (mean output length x TPOT SLO)."""
    _, outs = lengths.sample(1000, np.random.default_rng(0))
    life = (slo.ttft if math.isfinite(slo.ttft) else 0.0)
    if math.isfinite(slo.tpot):
        life += float(outs.mean() - 1) * slo.tpot
    return life


def _interpolate(lo: float, a_lo: float, hi: float, a_hi: float, target: float) -> float:
    if a_lo <= a_hi:
        return lo
    return lo + (a_lo - target) / (a_lo - a_hi) * (hi - lo)


def goodput(deployment, lengths: Lengths, slo: SLO, n: int = DEFAULT_REQUESTS, seeds=(0,),
            guess: float = 1.0, rel_tol: float = 0.02, burstiness: float = 1.0) -> Goodput:
    """Goodput over several seeds (mean rate; the per-seed rates give the spread)."""
    probes: list = []
    rates = []
    for i, seed in enumerate(seeds):
        r = goodput_one(deployment, lengths, slo, n, seed, guess, rel_tol, burstiness,
                        probes=probes if i == 0 else None)
        rates.append(r)
        guess = r if 0 < r < math.inf else guess
    return Goodput(float(np.mean(rates)), rates, probes)


def capacity_guess(deployment, lengths: Lengths) -> float:
    """A starting rate: what the prefill side can do for the average prompt, one at a time."""
    ins, _ = lengths.sample(256, np.random.default_rng(1))
    inst = getattr(deployment, "prefill", None) or deployment.instance
    count = getattr(deployment, "num_prefill", None) or deployment.num_instances
    t = inst.latency.prefill_busy(1, ins.mean(), ins.mean() ** 2)
    return max(count / max(t, 1e-6), 1e-3)
