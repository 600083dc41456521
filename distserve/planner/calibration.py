"""Rescaling a latency profile to the speed a machine actually ran at: per phase, the profile's
prefill times x k_prefill and decode times x k_decode, where the factors come from the
instances' step traces (distserve.planner.step_traces.run_speed), from a calibration load
just before a run, or from the host model (distserve.planner.host_model). The simulated
deployment is built by the caller from the rescaled profile (`deployment_of`), so any
deployment the simulator knows can be rescaled.
It must never measure anything or import torch: it turns measured factors into profiles.
"""
from __future__ import annotations

import math
import pathlib
from typing import Callable

from distserve.planner.profiles import ProfileEntry
from distserve.planner.step_traces import read_traces, run_speed, server_ttft_s, summarise

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


def parse_speed(text: str) -> dict:
    """`--speed K` (both phases) or `--speed PREFILL:DECODE`: factors on the profile's times."""
    parts = text.split(":")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--speed must be K or PREFILL:DECODE, positive factors on the "
                         f"profile's times, got {text!r}")
    return {"prefill": values[0], "decode": values[-1]}


def speed_of_traces(folder: str, entry: ProfileEntry) -> dict:
    """How much slower than `entry` the model steps of a served run ran, per phase, from its
    instances' step traces in `folder` (`DISTSERVE_STEP_TRACE=folder distserve serve ...`)."""
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"--step-traces {folder!r} is not a folder")
    traces = read_traces(path, -math.inf, math.inf)
    summary = summarise(traces, entry, 0.0)
    if not any(s["prefill_steps"] or s["decode_steps"] for s in summary.values()):
        raise ValueError(f"--step-traces {folder!r} holds no model steps (*.jsonl written by "
                         f"instances started with DISTSERVE_STEP_TRACE={folder})")
    return run_speed(summary)
