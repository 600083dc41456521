"""Reading the instances' step traces (DISTSERVE_STEP_TRACE, written by
distserve/cluster/step_trace.py): how fast a served deployment's engine iterations ran
against the profile, per phase (run_speed), how that speed moved within the run
(speed_timeline, for distserve.planner.time_warp), and where a request's time went before
its first token (summarise). That tells a latency model that is wrong (model steps slower
than the profile says) from time the simulator does not model (queueing outside the engine,
delivery of the first token).
It must never serve, simulate or import torch: it reads traces and the profile.
"""
from __future__ import annotations

import json
import pathlib
import statistics

from distserve.cluster.step_samples import BACK_TO_BACK_S   # the live instances' same rule


def read_traces(folder: pathlib.Path, start: float, end: float) -> dict[str, list[dict]]:
    """instance id -> its records with a time in [start, end]."""
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        recs = []
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if start <= r.get("t", r.get("t0", 0.0)) <= end:
                recs.append(r)
        out[path.stem] = recs
    return out


def iterations(recs: list[dict]):
    """(step record, seconds) per model step of one instance, where the seconds run to the next
    step's start when that follows at once: an engine iteration, as the simulator times it
    (sampling, detokenising, sending, a decode instance's KV pulls), not the model alone."""
    steps = [r for r in recs if r["ev"] == "step"]
    for r, nxt in zip(steps, steps[1:] + [None]):
        gap = nxt["t0"] - r["t1"] if nxt is not None else None
        yield r, (nxt["t0"] - r["t0"]) if gap is not None and gap < BACK_TO_BACK_S else (r["t1"] - r["t0"])


def profiled(step: dict, entry) -> tuple[str, float] | None:
    """(phase, the profile's ms) for a prefill-only or decode-only step; None for a mixed one."""
    if step["prefill"] and not step["decode"]:
        return "prefill", entry.prefill_ms([n for _, n, _ in step["prefill"]])
    if step["decode"] and not step["prefill"]:
        return "decode", entry.decode_ms(step["decode"])
    return None


def _mean(xs) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarise(traces: dict[str, list[dict]], entry, window_s: float) -> dict:
    """Per instance: busy share, model steps against the profile (measured / predicted), and
    for requests whose first token it computed: wait from the controller to the instance, queue
    wait, and first-token compute."""
    out = {}
    for iid, recs in traces.items():
        steps = [r for r in recs if r["ev"] == "step"]
        recv = {r["id"]: r for r in recs if r["ev"] == "recv"}
        measured = {"prefill": [], "decode": []}   # (ms, the profile's ms) per iteration
        first_step: dict[str, dict] = {}
        for s, seconds in iterations(recs):
            known = profiled(s, entry)
            if known is not None:
                measured[known[0]].append((seconds * 1e3, known[1]))
            for rid, n, ctx in s["prefill"]:
                if rid in recv and ctx == recv[rid]["prompt"]:
                    first_step[rid] = s
        to_instance = [recv[rid]["t"] - recv[rid]["arrival"] for rid in first_step if recv[rid]["arrival"]]
        queued = [first_step[rid]["t0"] - recv[rid]["t"] for rid in first_step]
        server_ttft = [first_step[rid]["t1"] - recv[rid]["arrival"] for rid in first_step if recv[rid]["arrival"]]
        busy = sum(s["t1"] - s["t0"] for s in steps)  # the model's share of the time
        out[iid] = {"busy_share": busy / window_s if window_s else None}
        for phase, pairs in measured.items():
            ratios = [ms / pred for ms, pred in pairs]
            out[iid].update({
                f"{phase}_steps": len(pairs), f"{phase}_step_ms_mean": _mean([ms for ms, _ in pairs]),
                f"{phase}_measured_over_profile_mean": _mean(ratios),
                f"{phase}_measured_over_profile_median": statistics.median(ratios) if ratios else None,
                f"{phase}_ms_total": sum(ms for ms, _ in pairs),
                f"{phase}_profile_ms_total": sum(pred for _, pred in pairs)})
        out[iid].update({
            "first_tokens": len(first_step),
            "controller_to_instance_ms_mean": _mean([x * 1e3 for x in to_instance]),
            "queue_wait_ms_mean": _mean([x * 1e3 for x in queued]),
            "arrival_to_first_token_computed_ms_mean": _mean([x * 1e3 for x in server_ttft]),
        })
    return out


def run_speed(summary: dict) -> dict:
    """How much slower than the profile each phase's model steps ran in this run, over all
    instances: measured time / profiled time of the same steps (1.0 where none ran)."""
    out = {}
    for phase in ("prefill", "decode"):
        measured = sum(s[f"{phase}_ms_total"] for s in summary.values())
        profiled = sum(s[f"{phase}_profile_ms_total"] for s in summary.values())
        out[phase] = measured / profiled if profiled else 1.0
    return out


def speed_timeline(traces: dict[str, list[dict]], entry, num_requests: int, speed: dict,
                   bin_s: float = 1.0) -> dict:
    """How the machine's speed varied during a run, relative to the run's own mean: per
    `bin_s` bin from the run's first arrival, the model steps' measured / profiled time,
    each phase divided by its run-mean factor (`speed`, from `run_speed`), weighted by
    profiled time;
    bins without steps count 1. The host of this machine has slow spells of seconds (a
    quarter of the decode steps 1.6x slower, in runs), which spread TPOTs; the simulator can
    replay them as a time warp (distserve.planner.time_warp).
    `num_requests`: the run's requests, the last arrivals in the traces (the bench's test
    request comes before them)."""
    arrivals = sorted({r["arrival"] for recs in traces.values() for r in recs
                       if r["ev"] == "recv" and r.get("arrival")})
    if len(arrivals) < num_requests or not num_requests:
        return {}
    origin = arrivals[-num_requests]
    sums: dict[int, list[float]] = {}
    for recs in traces.values():
        for r, seconds in iterations(recs):
            known = profiled(r, entry)
            if r["t0"] < origin or known is None:
                continue
            phase, pred = known
            acc = sums.setdefault(int((r["t0"] - origin) / bin_s), [0.0, 0.0])
            acc[0] += seconds * 1e3 / speed[phase]
            acc[1] += pred
    if not sums:
        return {}
    warp = [sums[b][0] / sums[b][1] if b in sums and sums[b][1] else 1.0 for b in range(max(sums) + 1)]
    return {"bin_s": bin_s, "warp": warp}


def server_ttft_s(summary: dict) -> float:
    """The mean time from a request's arrival to its first token computed, over the instances
    that computed first tokens (weighted by how many): the TTFT the instances saw, without
    the serving path around them (0 when none did)."""
    served = [s["arrival_to_first_token_computed_ms_mean"] for s in summary.values() if s["first_tokens"]]
    weights = [s["first_tokens"] for s in summary.values() if s["first_tokens"]]
    return sum(a * w for a, w in zip(served, weights)) / sum(weights) * 1e-3 if weights else 0.0
