"""A served run against the simulation of exactly its arrivals and lengths: the
simulator-vs-reality check's comparison (benchmarks/sim_vs_real.py drives it). A run is a
`distserve bench` result with what the check recorded beside it: the CPU seconds of every
process (`_cpu`, for distserve.planner.host_model), the instances' step-trace summary and
speed timeline (`_trace`, `_speed_timeline`), the speed a calibration load just before it
measured (`_calibration`) and the same trace run again (`_repeats`). Each comparison gives
the real and the simulated SLO attainment and latencies, with the profile as measured,
stretched by the host model, rescaled to the calibration's speed and to the run's own
speed (its slow spells replayed as a time warp), and the speed error that would explain
what is left.
It must never start a server, run a benchmark or import torch: it reads saved runs.
"""
from __future__ import annotations

import math
import time

import numpy as np

from distserve.planner.calibration import DeploymentOf, at_run_speed, at_speed, scaled
from distserve.planner.host_model import host_slowdown
from distserve.planner.profiles import ProfileEntry
from distserve.planner.simulator import simulate
from distserve.planner.time_warp import TimeWarp, simulate_warped
from distserve.planner.workload import Lengths, Trace, make_trace
from distserve.slo import attainment


def fresh_attainment(dep, lengths: Lengths, rate: float, n: int, slo: dict, seeds) -> list[float]:
    """Simulated attainment on fresh traces of `lengths` at `rate`, one per seed: the spread
    that another sample of the same workload gives."""
    return [simulate(make_trace(lengths, n, rate, seed), dep).attainment(slo["ttft"], slo["tpot"])
            for seed in seeds]


def runs_of(doc: dict) -> list[dict]:
    """The runs of a deployment's saved document (an older one is a single run)."""
    return doc.get("runs") or [doc]


def trace_of(run: dict) -> tuple[Trace, np.ndarray]:
    """The arrivals and lengths a real run sent (sorted by send time) and the order used."""
    reqs = run["requests"]
    send = np.array([r["send_time"] for r in reqs], float)
    order = np.argsort(send, kind="stable")
    ins = np.array([r["input_len"] for r in reqs], np.int64)
    outs = np.array([r["output_len"] if r["success"] else r["expected_output_len"] for r in reqs], np.int64)
    return Trace(send[order] - send[order][0], ins[order], outs[order]), order


def real_latencies(run: dict, order) -> tuple[np.ndarray, np.ndarray]:
    """The run's TTFTs and TPOTs in `order` (infinite for a failed request)."""
    reqs = [run["requests"][i] for i in order]
    ttft = np.array([r["ttft"] if r["success"] else math.inf for r in reqs], float)
    tpot = np.array([r["tpot"] if r["success"] and r["tpot"] is not None else math.inf for r in reqs], float)
    return ttft, tpot


def stats(ttft: np.ndarray, tpot: np.ndarray, slo: dict) -> dict:
    """SLO attainment (both, and each alone) and TTFT and TPOT means and p90s of finite ones."""
    both, ok_t, ok_p = attainment(ttft, tpot, slo["ttft"], slo["tpot"]) or (0.0, 0.0, 0.0)
    ft, fp = ttft[np.isfinite(ttft)], tpot[np.isfinite(tpot)]
    return {"attainment": both, "ttft_attainment": ok_t, "tpot_attainment": ok_p,
            "ttft_mean": float(ft.mean()) if len(ft) else None,
            "ttft_p90": float(np.percentile(ft, 90)) if len(ft) else None,
            "tpot_mean": float(fp.mean()) if len(fp) else None,
            "tpot_p90": float(np.percentile(fp, 90)) if len(fp) else None}


def replay(doc: dict, dep, slo: dict) -> list[dict]:
    """Each run of a `distserve bench` result against the simulation of exactly its arrivals
    and lengths on `dep`: measured and predicted SLO attainment and latencies."""
    rows = []
    for run in runs_of(doc):
        if not run.get("requests"):
            continue
        trace, order = trace_of(run)
        sim = simulate(trace, dep)
        real, predicted = stats(*real_latencies(run, order), slo), stats(sim.ttft, sim.tpot, slo)
        rows.append({"rate": run.get("request_rate"), "requests": len(trace), "measured": real,
                     "predicted": predicted,
                     "error_pp": 100 * (predicted["attainment"] - real["attainment"])})
    if not rows:
        raise ValueError("the bench result holds no requests to replay (save it with "
                         "`distserve bench --save-result FILE`)")
    return rows


def probe_check(doc: dict, entry: ProfileEntry) -> dict | None:
    """Requests served one at a time: real TTFT against the profile's prefill of the prompt,
    real TPOT against its decode step of one request. The median TTFT excess is the serving
    path's own latency (HTTP, tokenising, the control hops, streaming the token back), which
    occupies no instance: the simulated TTFTs get it added. The TPOT ratio checks the
    profile (a profile measured while other jobs ran is off here)."""
    probe = doc.get("probe")
    if not probe:
        return None
    ok = [r for r in probe["requests"] if r["success"]]
    extra = [r["ttft"] - entry.prefill_ms([r["input_len"]]) * 1e-3 for r in ok]
    ratio = [r["tpot"] / (entry.decode_ms([r["input_len"] + r["output_len"] / 2]) * 1e-3)
             for r in ok if r["output_len"] > 1]
    return {"ttft_extra_s": max(float(np.median(extra)), 0.0) if extra else 0.0,
            "ttft_extra_all_s": extra, "tpot_over_profile": float(np.median(ratio)) if ratio else None}


SPEED_GRID = np.round(np.arange(0.70, 1.3001, 0.01), 2)


def speed_to_match(trace: Trace, deployment_of: DeploymentOf, entry: ProfileEntry, speed: dict,
                   serving_s: float, slo: dict, real_attainment: float,
                   warp: TimeWarp | None = None) -> dict:
    """How far off the speed given to the simulator would have to be for it to predict the
    real attainment: every step x f, f on a 1% grid from 0.70 to 1.30, and the f nearest 1
    whose simulated attainment is within one request of the real one (the closest one when
    none is). Near the knee of the attainment curve a few % of machine speed move it tens of
    points: `pp_per_pct` is that slope around f = 1 (points of attainment per 1% of speed).
    Tells a model that is wrong from a speed that was measured a few % off."""
    def attainment(f: float) -> float:
        dep = deployment_of(scaled(entry, speed["prefill"] * f, speed["decode"] * f))
        if warp is not None:
            ttft, tpot = simulate_warped(trace, dep, warp)
        else:
            sim = simulate(trace, dep)
            ttft, tpot = sim.ttft, sim.tpot
        return stats(ttft + serving_s, tpot, slo)["attainment"]

    atts = {float(f): attainment(float(f)) for f in SPEED_GRID}
    diff = {f: abs(a - real_attainment) for f, a in atts.items()}
    close = [f for f in atts if diff[f] <= 1.0 / len(trace) + 1e-9] or [min(atts, key=diff.get)]
    f = min(close, key=lambda x: (abs(x - 1.0), x))
    return {"factor": f, "diff_pp": 100 * diff[f], "pp_per_pct": 100 * (atts[0.95] - atts[1.05]) / 10}


def simulate_at_run_speed(deployment_of: DeploymentOf, entry: ProfileEntry, run: dict, trace: Trace,
                          slo: dict, real_attainment: float) -> dict | None:
    """The run simulated at its own measured speed (None without step traces), with its slow
    spells replayed when it has a speed timeline, and the speed error that would explain
    what is left."""
    if not run.get("_trace"):
        return None
    dep_s, speed, d_run = at_run_speed(deployment_of, entry, run)
    sim_s2 = simulate(trace, dep_s)
    s2 = stats(sim_s2.ttft + d_run, sim_s2.tpot, slo)
    timed = {"speed": speed, "serving_latency_s": d_run, "sim": s2,
             "diff_pp": 100 * abs(real_attainment - s2["attainment"])}
    timeline = run.get("_speed_timeline")
    warp = TimeWarp(timeline["warp"], timeline["bin_s"]) if timeline else None
    if warp is not None:
        ttft_w, tpot_w = simulate_warped(trace, dep_s, warp)
        s3 = stats(ttft_w + d_run, tpot_w, slo)
        timed.update(sim_warped=s3, diff_warped_pp=100 * abs(real_attainment - s3["attainment"]),
                     slow_share=float(np.mean(np.asarray(timeline["warp"]) > 1.3)),
                     within_run_speed_std=float(np.std(timeline["warp"])))
    timed["to_match"] = speed_to_match(trace, deployment_of, entry, speed, d_run, slo, real_attainment, warp)
    return timed


def compare(deployment_of: DeploymentOf, doc: dict, entry, slo: dict, lengths: Lengths, seeds: int,
            host_model: bool = True, serving_latency: bool = True, interference: dict | None = None) -> list[dict]:
    """One row per run of `doc` (a deployment's saved runs, its one-at-a-time probe among
    them): real against simulated attainment and latencies, `deployment_of` building the
    simulated deployment from a (rescaled) profile. `host_model`: stretch the steps by the
    host model (with `interference` when given); `serving_latency`: add the probe's
    serving-path latency to the simulated TTFTs."""
    bare_dep = deployment_of(entry)
    probe = probe_check(doc, entry)
    d0 = probe["ttft_extra_s"] if probe and serving_latency else 0.0
    rows = []
    for run in runs_of(doc):
        trace, order = trace_of(run)
        host = host_slowdown(run, interference=interference) if host_model else None
        dep = at_speed(deployment_of, entry, host["k"] if host else None)
        t0 = time.perf_counter()
        sim = simulate(trace, dep)
        sim.ttft = sim.ttft + d0
        sim_s = time.perf_counter() - t0
        bare = simulate(trace, bare_dep)
        bare.ttft = bare.ttft + d0
        real = stats(*real_latencies(run, order), slo)
        simd = stats(sim.ttft, sim.tpot, slo)
        fresh = fresh_attainment(dep, lengths, run["request_rate"], len(trace),
                                 {**slo, "ttft": slo["ttft"] - d0}, range(100, 100 + seeds))
        calibrated = None
        if run.get("_calibration"):   # the profile rescaled to the speed measured just before
            speed = run["_calibration"]["speed"]
            sim_c = simulate(trace, at_speed(deployment_of, entry, speed))
            s_c = stats(sim_c.ttft + d0, sim_c.tpot, slo)
            calibrated = {"speed": speed, "sim": s_c, "diff_pp": 100 * abs(real["attainment"] - s_c["attainment"])}
        timed = simulate_at_run_speed(deployment_of, entry, run, trace, slo, real["attainment"])
        repeats = []
        for again in run.get("_repeats", []):   # the same arrivals once more: reality against itself
            trace_r, order_r = trace_of(again)
            real_r = stats(*real_latencies(again, order_r), slo)
            sim_r = simulate_at_run_speed(deployment_of, entry, again, trace_r, slo, real_r["attainment"])
            repeats.append({"real": real_r, "diff_vs_first_pp": 100 * abs(real["attainment"] - real_r["attainment"]),
                            "at_run_speed": sim_r})
        tokens = sum(r["output_len"] for r in run["requests"] if r["success"])
        cpu = run.get("_cpu") or {}
        rows.append({"rate": run["request_rate"], "n": len(trace), "failed": run.get("num_failed", 0),
                     "duration": run.get("duration"), "cpu": cpu, "host": host, "serving_latency_s": d0,
                     "host_ms_per_token": 1e3 * (cpu.get("server_s", 0) + cpu.get("bench_s", 0)) / tokens
                     if cpu and tokens else None,
                     "real": real, "sim": simd, "sim_without_host": stats(bare.ttft, bare.tpot, slo),
                     "sim_seconds": sim_s, "calibrated": calibrated, "at_run_speed": timed, "repeats": repeats,
                     "fresh_mean": float(np.mean(fresh)), "fresh_std": float(np.std(fresh)),
                     "diff_pp": 100 * abs(real["attainment"] - simd["attainment"])})
    return rows
