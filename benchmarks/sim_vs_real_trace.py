"""Where the time goes in a served run, from the instances' step traces (DISTSERVE_STEP_TRACE,
distserve/cluster/step_trace.py): the simulator-vs-reality check uses it to tell a latency
model that is wrong (model steps slower than the profile says) from time the simulator does
not model (queueing outside the engine, delivery of the first token).
It must never serve or simulate: it reads traces and the profile.
"""
from __future__ import annotations

import json
import pathlib
import statistics


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
        pre_ratio, dec_ratio, pre_ms, dec_ms, pre_pred, dec_pred = [], [], [], [], [], []
        first_step: dict[str, dict] = {}
        for s in steps:
            ms = (s["t1"] - s["t0"]) * 1e3
            if s["prefill"] and not s["decode"]:
                pred = entry.prefill_ms([n for _, n, _ in s["prefill"]])
                pre_ratio.append(ms / pred)
                pre_ms.append(ms)
                pre_pred.append(pred)
            elif s["decode"] and not s["prefill"]:
                pred = entry.decode_ms(s["decode"])
                dec_ratio.append(ms / pred)
                dec_ms.append(ms)
                dec_pred.append(pred)
            for rid, n, ctx in s["prefill"]:
                if rid in recv and ctx == recv[rid]["prompt"]:
                    first_step[rid] = s
        to_instance = [recv[rid]["t"] - recv[rid]["arrival"] for rid in first_step if recv[rid]["arrival"]]
        queued = [first_step[rid]["t0"] - recv[rid]["t"] for rid in first_step]
        server_ttft = [first_step[rid]["t1"] - recv[rid]["arrival"] for rid in first_step if recv[rid]["arrival"]]
        busy = sum(s["t1"] - s["t0"] for s in steps)
        out[iid] = {
            "busy_share": busy / window_s if window_s else None,
            "prefill_steps": len(pre_ms), "prefill_step_ms_mean": _mean(pre_ms),
            "prefill_measured_over_profile_mean": _mean(pre_ratio),
            "prefill_measured_over_profile_median": statistics.median(pre_ratio) if pre_ratio else None,
            "decode_steps": len(dec_ms), "decode_step_ms_mean": _mean(dec_ms),
            "decode_measured_over_profile_mean": _mean(dec_ratio),
            "decode_measured_over_profile_median": statistics.median(dec_ratio) if dec_ratio else None,
            "prefill_ms_total": sum(pre_ms), "prefill_profile_ms_total": sum(pre_pred),
            "decode_ms_total": sum(dec_ms), "decode_profile_ms_total": sum(dec_pred),
            "first_tokens": len(first_step),
            "controller_to_instance_ms_mean": _mean([x * 1e3 for x in to_instance]),
            "queue_wait_ms_mean": _mean([x * 1e3 for x in queued]),
            "arrival_to_first_token_computed_ms_mean": _mean([x * 1e3 for x in server_ttft]),
        }
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


def describe(summary: dict) -> str:
    lines = []
    for iid, s in summary.items():
        def f(key, fmt="{:.2f}", s=s):
            return "-" if s[key] is None else fmt.format(s[key])
        lines.append(f"    {iid}: busy {f('busy_share')}; prefill steps {s['prefill_steps']} "
                     f"(mean {f('prefill_step_ms_mean', '{:.1f}')} ms, measured/profile mean "
                     f"{f('prefill_measured_over_profile_mean')}, median {f('prefill_measured_over_profile_median')}); "
                     f"decode steps {s['decode_steps']} (mean {f('decode_step_ms_mean', '{:.1f}')} ms, "
                     f"measured/profile mean {f('decode_measured_over_profile_mean')}, median "
                     f"{f('decode_measured_over_profile_median')})")
        if s["first_tokens"]:
            lines.append(f"      first tokens {s['first_tokens']}: controller->instance "
                         f"{f('controller_to_instance_ms_mean', '{:.1f}')} ms, queued "
                         f"{f('queue_wait_ms_mean', '{:.1f}')} ms, arrival->computed "
                         f"{f('arrival_to_first_token_computed_ms_mean', '{:.1f}')} ms")
    return "\n".join(lines)
