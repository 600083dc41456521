"""Rescaling a latency profile to the speed a machine actually ran at: per phase, the profile's
prefill times x k_prefill and decode times x k_decode, where the factors come from the
instances' step traces (distserve.planner.step_traces.run_speed), from a calibration load
just before a run, or from the host model (distserve.planner.host_model). The simulated
deployment is built by the caller from the rescaled profile (`deployment_of`), so any
deployment the simulator knows can be rescaled.
It must never measure anything or import torch: it turns measured factors into profiles.
"""
from __future__ import annotations

from typing import Callable

from distserve.planner.latency import ProfileEntry
from distserve.planner.step_traces import run_speed, server_ttft_s

DeploymentOf = Callable[[ProfileEntry], object]   # the simulated deployment of a profile


def scaled(entry: ProfileEntry, k: float, k_decode: float | None = None) -> ProfileEntry:
    """The profile with its prefill times x k and decode times x k_decode (default k)."""
    kd = k if k_decode is None else k_decode
    return ProfileEntry(tuple(k * x for x in entry.prefill), tuple(kd * x for x in entry.decode_small),
                        tuple(kd * x for x in entry.decode_large), entry.threshold, entry.decode_context)


def at_speed(deployment_of: DeploymentOf, entry: ProfileEntry, k: dict | None):
    """The simulated deployment with its prefill steps stretched by k["prefill"] and its
    decode steps by k["decode"] (in a disaggregated one, each instance runs one kind); the
    profile as it is when `k` is None."""
    return deployment_of(scaled(entry, k["prefill"], k["decode"]) if k else entry)


def at_run_speed(deployment_of: DeploymentOf, entry: ProfileEntry, run: dict):
    """The simulated deployment with the profile rescaled to the speed the run's own model
    steps ran at (from the instances' step traces, summarised in run["_trace"]), and the mean
    serving-path latency of the run (client TTFT beyond the instances' arrival-to-first-token
    time): what is left to compare is the simulator's queueing and batching, not the
    machine's speed of the hour."""
    speed = run_speed(run["_trace"])
    dep = at_speed(deployment_of, entry, speed)
    return dep, speed, max(run["mean_ttft_ms"] * 1e-3 - server_ttft_s(run["_trace"]), 0.0)
