"""Discrete-event simulator of a deployment over a request trace: per-request TTFT and TPOT.

`simulate(trace, deployment)` runs a Disaggregated deployment (disaggregated.py: prefill and
decode instances, KV pulled between them) or a Colocated one (colocated.py: both phases on
each instance, prefill-first or chunked). Requests are dispatched by the controller's rule
(distserve.dispatch). Decode batches step in closed form between membership changes (lane.py).
"""
from __future__ import annotations

from distserve.planner.simulator.colocated import Colocated, simulate_colocated
from distserve.planner.simulator.common import INF, InstanceConfig, SimResult
from distserve.planner.simulator.disaggregated import Disaggregated, simulate_disaggregated
from distserve.planner.workload import Trace

__all__ = ["INF", "Colocated", "Disaggregated", "InstanceConfig", "SimResult", "simulate"]


def simulate(trace: Trace, deployment: Disaggregated | Colocated) -> SimResult:
    """Per-request TTFT and TPOT of `trace` served by `deployment`."""
    if isinstance(deployment, Disaggregated):
        return simulate_disaggregated(trace, deployment)
    if isinstance(deployment, Colocated):
        return simulate_colocated(trace, deployment)
    raise TypeError(f"cannot simulate a {type(deployment).__name__}")
