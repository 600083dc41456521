"""Error bars on a predicted SLO attainment: how far the prediction could move for the two
reasons the simulator itself knows about, so that a measured point can be read against it.

- Fit band: the latency model is only as good as its fit. `distserve profile` records, per
  phase, the mean relative error of the fitted step times against the measured ones
  (`_fit_error` in the profile JSON); the instances' step traces measure the speed each run
  actually ran at, and that speed moves from run to run. The exact trace a run sent is
  replayed with every step of a phase faster and slower by the larger of the two (a relative
  width per phase): the attainment a speed error of that size would give.
- Seed band: the same rate and the same length mix, other samples of it. K traces of the
  run's own (prompt, output) pairs drawn with replacement, at fresh Poisson arrivals of the
  same rate and the same size, simulated on the same deployment (as the planner's goodput is
  an estimate over seeds): how much attainment at this rate depends on the sample.
- The predicted band is the lowest and highest of the point prediction, the fit band's ends
  and the seeds' attainments.
It must never serve, measure or import torch: it simulates traces it is given.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from distserve.planner.profiles import load_profile
from distserve.planner.simulator import simulate
from distserve.planner.workload import Trace, arrivals
from distserve.slo import attainment

PHASES = ("prefill", "decode")
DeploymentAt = Callable[[dict], object]   # the simulated deployment at a speed {phase: factor}


def fit_error(profile: str, model: str) -> dict | None:
    """Per phase, the mean relative error of the profile's fit for `model` (what `distserve
    profile` wrote in `_fit_error`), or None where the profile does not say (a built-in or
    hand-made one)."""
    try:
        errors = load_profile(profile).meta.get("_fit_error", {})
    except (FileNotFoundError, ValueError):
        return None
    for name, e in errors.items():
        if name.lower() == model.lower() and all(p in e for p in PHASES):
            return {p: float(e[p]["mean"]) for p in PHASES}
    return None


def speed_spread(speeds: list[dict]) -> dict | None:
    """Per phase, half the range of the speeds measured run by run, relative to their mean:
    how far the machine's speed moved between runs (a phase measured in fewer than two runs
    is left out; None when none is left)."""
    out = {}
    for p in PHASES:
        v = np.array([s[p] for s in speeds if s and s.get(p)], float)
        if len(v) >= 2:
            out[p] = float((v.max() - v.min()) / 2 / v.mean())
    return out or None


def fit_widths(fit: dict | None, spread: dict | None) -> dict:
    """The fit band's relative width per phase: the larger of the fit error and the run-to-run
    speed spread (0 where neither is known: then the fit band is the point)."""
    return {p: max((fit or {}).get(p, 0.0), (spread or {}).get(p, 0.0)) for p in PHASES}


def sim_attainment(trace: Trace, dep, slo: dict) -> float:
    """Simulated share of `trace` meeting both SLOs on `dep`."""
    sim = simulate(trace, dep)
    return attainment(sim.ttft, sim.tpot, slo["ttft"], slo["tpot"])[0]


def fit_band(trace: Trace, deployment_at: DeploymentAt, speed: dict | None, widths: dict,
             slo: dict) -> list[float]:
    """[low, high] attainment of `trace` replayed with each phase's steps slower and faster
    by its width around `speed` (the speed the point prediction used)."""
    base = speed or {p: 1.0 for p in PHASES}
    ends = [sim_attainment(trace, deployment_at({p: base[p] * (1 + sign * widths[p]) for p in PHASES}), slo)
            for sign in (1, -1)]
    return [min(ends), max(ends)]


def resampled(trace: Trace, rate: float, seed: int) -> Trace:
    """Another sample of the same workload: the trace's own (prompt, output) pairs drawn with
    replacement, at fresh Poisson arrivals of `rate`, as many requests."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(trace), len(trace))
    return Trace(arrivals(len(trace), rate, rng), trace.input_len[pick], trace.output_len[pick])


def seed_attainments(trace: Trace, dep, rate: float, slo: dict, seeds) -> list[float]:
    """Simulated attainment of one resampled trace per seed (see `resampled`)."""
    return [sim_attainment(resampled(trace, rate, seed), dep, slo) for seed in seeds]


def prediction_band(trace: Trace, deployment_at: DeploymentAt, speed: dict | None,
                    widths: dict, rate: float, slo: dict, seeds) -> dict:
    """The point prediction of `trace` at `speed` with its fit band, seed band and the
    predicted band over both (see the module docstring); attainments as shares."""
    dep = deployment_at(speed or {p: 1.0 for p in PHASES})
    point = sim_attainment(trace, dep, slo)
    fit = fit_band(trace, deployment_at, speed, widths, slo)
    by_seed = seed_attainments(trace, dep, rate, slo, seeds)
    everything = [point, *fit, *by_seed]
    return {"point": point, "low": min(everything), "high": max(everything), "fit": fit,
            "seeds": [min(by_seed), max(by_seed)] if by_seed else None, "by_seed": by_seed}


def inside(band: dict, measured: float) -> bool:
    """Whether a measured attainment falls in the predicted band (one request's rounding
    aside)."""
    return band["low"] - 1e-9 <= measured <= band["high"] + 1e-9
