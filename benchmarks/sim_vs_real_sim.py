"""Steps 2 and 4 of the simulator-vs-reality check (benchmarks/sim_vs_real.py): the planner's
simulator for each deployment, the SLOs and rates it picks, and the comparison of each real run
with the simulation of exactly its arrivals and lengths (stretched by the host processes' CPU).
It must never start a server: it reads the runs benchmarks/sim_vs_real_real.py saved.
"""
from __future__ import annotations

import math
import time

import numpy as np
from sim_vs_real_config import BLOCK, KV_GIB, MAX_BATCHED_TOKENS, MAX_NUM_SEQS
from sim_vs_real_trace import run_speed

from distserve.planner.colocated import Colocated
from distserve.planner.latency import InstanceLatency, ProfileEntry
from distserve.planner.simulator import Disaggregated, InstanceConfig, simulate
from distserve.planner.workload import Lengths, Trace, make_trace


def sim_deployment(name: str, entry, kv_tokens: int):
    inst = InstanceConfig(InstanceLatency(entry), kv_tokens, max_batch=MAX_NUM_SEQS,
                          max_prefill_tokens=MAX_BATCHED_TOKENS)
    if name == "colocated":
        return Colocated(inst, num_instances=2)
    return Disaggregated(inst, inst, 1, 1)   # KV over shared memory: the copy is ~free


def default_kv_tokens() -> int:
    """Tokens of a KV_GIB cache of SmolLM2 (30 layers, 3 KV heads of 64) in bf16, as the
    server sizes it; replaced by what the server reports once it is up."""
    per_block = 2 * 30 * 3 * 64 * 2 * BLOCK
    return int(KV_GIB * 2 ** 30 // per_block) * BLOCK


def slos(entry, lengths: Lengths, ttft_factor: float, tpot_factor: float) -> dict:
    ins, outs = lengths.sample(4000, np.random.default_rng(0))
    mean_in, mean_out = float(ins.mean()), float(outs.mean())
    prefill_s = entry.prefill_ms([mean_in]) * 1e-3
    step_s = entry.decode_ms([mean_in + mean_out / 2]) * 1e-3
    return {"ttft": ttft_factor * prefill_s, "tpot": tpot_factor * step_s, "mean_prefill_s": prefill_s,
            "decode_step_s": step_s, "mean_input_len": mean_in, "mean_output_len": mean_out}


def fresh_attainment(dep, lengths: Lengths, rate: float, n: int, slo: dict, seeds) -> list[float]:
    return [simulate(make_trace(lengths, n, rate, seed), dep).attainment(slo["ttft"], slo["tpot"])
            for seed in seeds]


def pick_rates(deps: dict, lengths: Lengths, slo: dict, count: int, n: int) -> list[float]:
    """`count` evenly spaced rates from where the weaker deployment still simulates ~99%
    attainment to where the stronger one falls to ~35% (fresh traces, 3 seeds)."""
    grid = np.geomspace(0.05, 50, 120)
    curves = {k: [np.mean(fresh_attainment(d, lengths, r, n, slo, range(3))) for r in grid]
              for k, d in deps.items()}

    def first_below(curve, level):
        for r, a in zip(grid, curve):
            if a < level:
                return r
        return grid[-1]

    lo = min(first_below(c, 0.99) for c in curves.values())
    hi = max(first_below(c, 0.35) for c in curves.values())
    return [float(f"{r:.3g}") for r in np.linspace(lo, hi, count)]


def runs_of(doc: dict) -> list[dict]:
    return doc.get("runs") or [doc]


# ----------------------------------------------------------------------------- comparison
def trace_of(run: dict) -> tuple[Trace, np.ndarray]:
    """The arrivals and lengths a real run sent (sorted by send time) and the order used."""
    reqs = run["requests"]
    send = np.array([r["send_time"] for r in reqs], float)
    order = np.argsort(send, kind="stable")
    ins = np.array([r["input_len"] for r in reqs], np.int64)
    outs = np.array([r["output_len"] if r["success"] else r["expected_output_len"] for r in reqs], np.int64)
    return Trace(send[order] - send[order][0], ins[order], outs[order]), order


def real_latencies(run: dict, order) -> tuple[np.ndarray, np.ndarray]:
    reqs = [run["requests"][i] for i in order]
    ttft = np.array([r["ttft"] if r["success"] else math.inf for r in reqs], float)
    tpot = np.array([r["tpot"] if r["success"] and r["tpot"] is not None else math.inf for r in reqs], float)
    return ttft, tpot


def stats(ttft: np.ndarray, tpot: np.ndarray, slo: dict) -> dict:
    ok_t, ok_p = ttft <= slo["ttft"], tpot <= slo["tpot"]
    ft, fp = ttft[np.isfinite(ttft)], tpot[np.isfinite(tpot)]
    return {"attainment": float(np.mean(ok_t & ok_p)), "ttft_attainment": float(np.mean(ok_t)),
            "tpot_attainment": float(np.mean(ok_p)),
            "ttft_mean": float(ft.mean()) if len(ft) else None,
            "ttft_p90": float(np.percentile(ft, 90)) if len(ft) else None,
            "tpot_mean": float(fp.mean()) if len(fp) else None,
            "tpot_p90": float(np.percentile(fp, 90)) if len(fp) else None}


def scaled(entry: ProfileEntry, k: float, k_decode: float | None = None) -> ProfileEntry:
    """The profile with its prefill times x k and decode times x k_decode (default k)."""
    kd = k if k_decode is None else k_decode
    return ProfileEntry(tuple(k * x for x in entry.prefill), tuple(kd * x for x in entry.decode_small),
                        tuple(kd * x for x in entry.decode_large), entry.threshold, entry.decode_context)


class TimeWarp:
    """Wall time <-> machine time for a machine whose speed varies: a bin where steps ran w
    times slower than the mean passes 1/w of machine time per second. Simulating in machine
    time and mapping back replays the run's slow spells on every instance at once."""

    def __init__(self, warp: list[float], bin_s: float) -> None:
        w = np.clip(np.asarray(warp, float), 0.2, 5.0)
        self.bin_s = bin_s
        self.wall = np.arange(len(w) + 1) * bin_s
        self.machine = np.concatenate([[0.0], np.cumsum(bin_s / w)])

    def to_machine(self, t: np.ndarray) -> np.ndarray:
        return self._map(t, self.wall, self.machine)

    def to_wall(self, m: np.ndarray) -> np.ndarray:
        return self._map(m, self.machine, self.wall)

    @staticmethod
    def _map(x, xs, ys):
        x = np.asarray(x, float)
        inside = np.interp(x, xs, ys)
        past = ys[-1] + (x - xs[-1])   # after the last bin: the mean speed
        return np.where(x > xs[-1], past, inside)


def simulate_warped(trace: Trace, dep, warp: TimeWarp):
    """TTFT and TPOT (wall seconds) of `trace` simulated in the warp's machine time."""
    moved = Trace(warp.to_machine(trace.arrival), trace.input_len, trace.output_len)
    sim = simulate(moved, dep)
    out = trace.output_len.astype(float)
    first_m = moved.arrival + sim.ttft
    last_m = first_m + sim.tpot * np.maximum(out - 1, 0)
    first, last = warp.to_wall(first_m), warp.to_wall(last_m)
    ttft = np.where(np.isfinite(sim.ttft), first - trace.arrival, np.inf)
    tpot = np.where(np.isfinite(sim.tpot) & (out > 1), (last - first) / np.maximum(out - 1, 1), sim.tpot)
    return ttft, tpot


def at_run_speed(name: str, entry: ProfileEntry, kv: int, run: dict):
    """The simulated deployment with the profile rescaled to the speed the run's own model
    steps ran at (from the instances' step traces), and the mean serving-path latency of the
    run (client TTFT beyond the instances' arrival-to-first-token time): what is left to
    compare is the simulator's queueing and batching, not the machine's speed of the hour."""
    speed = run_speed(run["_trace"])
    dep = sim_deployment_k(name, entry, kv, speed)
    served = [s["arrival_to_first_token_computed_ms_mean"] for s in run["_trace"].values()
              if s["first_tokens"]]
    weights = [s["first_tokens"] for s in run["_trace"].values() if s["first_tokens"]]
    server_ttft = sum(a * w for a, w in zip(served, weights)) / sum(weights) * 1e-3 if weights else 0.0
    return dep, speed, max(run["mean_ttft_ms"] * 1e-3 - server_ttft, 0.0)


SPEED_GRID = np.round(np.arange(0.70, 1.3001, 0.01), 2)


def speed_to_match(trace: Trace, name: str, entry: ProfileEntry, kv: int, speed: dict,
                   serving_s: float, slo: dict, real_attainment: float,
                   warp: TimeWarp | None = None) -> dict:
    """How far off the speed given to the simulator would have to be for it to predict the
    real attainment: every step x f, f on a 1% grid from 0.70 to 1.30, and the f nearest 1
    whose simulated attainment is within one request of the real one (the closest one when
    none is). Near the knee of the attainment curve a few % of machine speed move it tens of
    points: `pp_per_pct` is that slope around f = 1 (points of attainment per 1% of speed).
    Tells a model that is wrong from a speed that was measured a few % off."""
    def attainment(f: float) -> float:
        dep = sim_deployment(name, scaled(entry, speed["prefill"] * f, speed["decode"] * f), kv)
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
    `k[phase]` is the mean over the instances that run that phase."""
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


def sim_deployment_k(name: str, entry: ProfileEntry, kv: int, k: dict | None):
    """The simulated deployment with its prefill steps stretched by k["prefill"] and its
    decode steps by k["decode"] (in a disaggregated one, each instance runs one kind)."""
    return sim_deployment(name, scaled(entry, k["prefill"], k["decode"]) if k else entry, kv)


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


def simulate_at_run_speed(name: str, entry: ProfileEntry, kv: int, run: dict, trace: Trace, slo: dict,
                          real_attainment: float) -> dict | None:
    """The run simulated at its own measured speed (None without step traces), with its slow
    spells replayed when it has a speed timeline, and the speed error that would explain
    what is left."""
    if not run.get("_trace"):
        return None
    dep_s, speed, d_run = at_run_speed(name, entry, kv, run)
    sim_s2 = simulate(trace, dep_s)
    s2 = stats(sim_s2.ttft + d_run, sim_s2.tpot, slo)
    at_speed = {"speed": speed, "serving_latency_s": d_run, "sim": s2,
                "diff_pp": 100 * abs(real_attainment - s2["attainment"])}
    timeline = run.get("_speed_timeline")
    warp = TimeWarp(timeline["warp"], timeline["bin_s"]) if timeline else None
    if warp is not None:
        ttft_w, tpot_w = simulate_warped(trace, dep_s, warp)
        s3 = stats(ttft_w + d_run, tpot_w, slo)
        at_speed.update(sim_warped=s3, diff_warped_pp=100 * abs(real_attainment - s3["attainment"]),
                        slow_share=float(np.mean(np.asarray(timeline["warp"]) > 1.3)),
                        within_run_speed_std=float(np.std(timeline["warp"])))
    at_speed["to_match"] = speed_to_match(trace, name, entry, kv, speed, d_run, slo,
                                          real_attainment, warp)
    return at_speed


def compare(name: str, doc: dict, entry, slo: dict, lengths: Lengths, seeds: int,
            host_model: bool = True, serving_latency: bool = True, interference: dict | None = None) -> list[dict]:
    kv = doc.get("_server", {}).get("kv_tokens_per_instance") or default_kv_tokens()
    bare_dep = sim_deployment(name, entry, kv)
    probe = probe_check(doc, entry)
    d0 = probe["ttft_extra_s"] if probe and serving_latency else 0.0
    rows = []
    for run in runs_of(doc):
        trace, order = trace_of(run)
        host = host_slowdown(run, interference=interference) if host_model else None
        dep = sim_deployment_k(name, entry, kv, host["k"] if host else None)
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
            sim_c = simulate(trace, sim_deployment_k(name, entry, kv, speed))
            s_c = stats(sim_c.ttft + d0, sim_c.tpot, slo)
            calibrated = {"speed": speed, "sim": s_c, "diff_pp": 100 * abs(real["attainment"] - s_c["attainment"])}
        at_speed = simulate_at_run_speed(name, entry, kv, run, trace, slo, real["attainment"])
        repeats = []
        for again in run.get("_repeats", []):   # the same arrivals once more: reality against itself
            trace_r, order_r = trace_of(again)
            real_r = stats(*real_latencies(again, order_r), slo)
            sim_r = simulate_at_run_speed(name, entry, kv, again, trace_r, slo, real_r["attainment"])
            repeats.append({"real": real_r, "diff_vs_first_pp": 100 * abs(real["attainment"] - real_r["attainment"]),
                            "at_run_speed": sim_r})
        tokens = sum(r["output_len"] for r in run["requests"] if r["success"])
        cpu = run.get("_cpu") or {}
        rows.append({"rate": run["request_rate"], "n": len(trace), "failed": run.get("num_failed", 0),
                     "duration": run.get("duration"), "cpu": cpu, "host": host, "serving_latency_s": d0,
                     "host_ms_per_token": 1e3 * (cpu.get("server_s", 0) + cpu.get("bench_s", 0)) / tokens
                     if cpu and tokens else None,
                     "real": real, "sim": simd, "sim_without_host": stats(bare.ttft, bare.tpot, slo),
                     "sim_seconds": sim_s, "calibrated": calibrated, "at_run_speed": at_speed, "repeats": repeats,
                     "fresh_mean": float(np.mean(fresh)), "fresh_std": float(np.std(fresh)),
                     "diff_pp": 100 * abs(real["attainment"] - simd["attainment"])})
    return rows
