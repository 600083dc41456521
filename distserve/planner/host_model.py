"""How much the processes sharing a machine with an instance slow its model steps: the host
processes (a server's HTTP + controller process, a bench client) taking time on the
instances' cores, and the neighbour instances contending for memory and cache. The inputs
are what a served run measured (the CPU seconds of every process over it) and, for the
neighbours and for what a host CPU-second costs a step, a measurement made once beside the
profile (benchmarks/interference.py). The result, a slowdown per phase, rescales a profile
(distserve.planner.calibration.at_speed) before simulating the run.
It must never measure anything itself or import torch: it reads numbers already taken.
"""
from __future__ import annotations

import numpy as np


def phases_of(role: str) -> tuple[str, ...]:
    """The steps an instance of `role` runs: a colocated instance runs both kinds."""
    return (role,) if role in ("prefill", "decode") else ("prefill", "decode")


def host_slowdown(run: dict, cores: int = 2, interference: dict | None = None) -> dict | None:
    """How much longer the instances' prefill and decode steps take because the host
    processes (the server's HTTP + controller process and the bench client, unpinned) run on
    the instances' cores, and, given `interference` (benchmarks/interference.py, measured with
    the profile), because the other instance runs beside them.

    Measured over the run (CPU accounting, not latencies): H, the host's CPU-seconds per
    second, and u_i, each instance's. The host's work comes when requests arrive and tokens
    stream, which is when the instances are busy: each host CPU-second displaces an
    instance, evenly over the cores, so instance i waits H / cores of each second against
    u_i of work and its steps stretch by 1 + a * H / (cores * u_i), where a is the time a
    host CPU-second costs a step of that phase (1 without `interference`; more when the host
    work leaves the caches cold). Against the instances' measured run-queue waits (schedstat)
    on the AMD host, with a = 1: within 1-3% from 3.9 req/s up (prefill 1.14-1.16 modelled,
    1.12-1.14 measured), 10% high at 1.9 req/s, where the prefill instance idles most; the
    earlier form, H * prod_(j != i) u_j / cores (a host task takes an idle core when there is
    one), was 3-8% low at every rate. Each other instance j then stretches them by
    1 + (c - 1) * u_j, c being the step-time ratio measured next to a neighbour running
    without pause in j's phase (a colocated neighbour runs both: the mean of the two).
    `k[phase]` is the mean over the instances that run that phase.

    `run`: its `duration` (s) and `_cpu`, the CPU seconds over it: `server_s`, `bench_s`,
    `instances_s` with the instances' `roles`, and optionally `instances_wait_s` (their
    run-queue waits, returned as `k_measured`). None when the run has no CPU accounting."""
    c, dur = run.get("_cpu"), run.get("duration")
    if not c or not dur or not c.get("instances_s"):
        return None
    h = (c["server_s"] + c["bench_s"]) / dur
    roles = c["roles"]
    u = [min(max(x / dur, 0.0), 1.0) for x in c["instances_s"]]
    named = len(set(roles)) == len(u)

    def host_cost(phase: str) -> float:
        return interference["host_cost"][phase]["median"] if interference else 1.0

    def next_to(phase: str, role: str) -> float:   # x (step time) next to a busy `role`, minus 1
        if not interference:
            return 0.0
        return float(np.mean([interference["contention"][phase][q]["median"] for q in phases_of(role)])) - 1

    parts: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}
    for i, (role, ui) in enumerate(zip(roles, u)):
        for phase in phases_of(role):
            k_host = 1 + host_cost(phase) * h / (cores * max(ui, 1e-3))
            k_next = 1 + sum(next_to(phase, roles[j]) * u[j] for j in range(len(u)) if j != i)
            parts[phase].append((k_host, k_next))

    def mean(f) -> dict:
        return {phase: float(np.mean([f(*x) for x in xs])) for phase, xs in parts.items() if xs}

    out = {"host_cores": h, "utilisation": dict(zip(roles, u)) if named else u,
           "k": mean(lambda a, b: a * b)}
    if interference:
        out.update(k_host=mean(lambda a, b: a), k_neighbour=mean(lambda a, b: b))
    if c.get("instances_wait_s"):   # preemption as measured per instance: waiting / running
        k = [1 + w / max(x, 1e-9) for w, x in zip(c["instances_wait_s"], c["instances_s"])]
        out["k_measured"] = dict(zip(roles, k)) if named else {"colocated": float(np.mean(k))}
    return out
