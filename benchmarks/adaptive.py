"""Adaptive resources (issue 18): a workload that shifts mid-run, served by the same
disaggregated plan with and without `serve --adapt`.

    python benchmarks/adaptive.py [--latency-profile P] [--phase-s 240] [--skip-real]

1. **At scale, in the simulator.** OPT-13B on eight A100s (the paper's latency profile), eight
   one-GPU instances: every split of prefill and decode instances on each phase at each rate,
   the split a plan for the first phase picks, and whether one split holds both phases (then
   a static plan of it needs no move). Then the shifting trace simulated whole at several
   rates: that split static, and the same split moved by the server's own check
   (planner.adapt.window_check: the window, the scoring and the hysteresis of `--adapt`) in
   the simulator's adaptive deployment (planner.simulator.adaptive: drained instances change
   role mid-run).
2. **For real on this machine.** SmolLM2 as three one-thread instances (two cores leave a
   2-instance deployment nothing to move: the last instance of a role never switches). The
   rate and the starting split come from this machine's latency profile: the split that serves
   the first phase best, at a rate where the second phase wants another split. The same trace
   (ShareGPT prompts, then LongBench-like ones, Poisson arrivals at one rate) is sent to
   `serve --plan` and to `serve --plan --adapt` with `distserve bench`; per request it records
   when it was sent and whether it met both SLOs, and /metrics' role switches as they happen.
Results: benchmarks/results/adaptive.json, adaptive.png (attainment over time, for real) and
adaptive_at_scale.png (the same, simulated at scale).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np

from serving import free_port, start_server, stop_server  # benchmarks/serving.py

from distserve.planner.adapt import Hysteresis, split_attainments, window_check
from distserve.planner.calibration import parse_speed
from distserve.planner.goodput import SLO
from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.models import MODELS, get_model
from distserve.planner.plan import PhasePlan, Plan
from distserve.planner.planning import planned_deployment
from distserve.planner.search import Problem
from distserve.planner.simulator import simulate
from distserve.planner.simulator.adaptive import simulate_adaptive
from distserve.planner.workload import Lengths, Trace, make_trace
from distserve.slo import meets

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"
TARGET = 0.9
PHASES = ("sharegpt", "longbench")


def split_plan(model: str, hardware: str, gpus: int, prefill: int, slo: SLO, workload: str,
               profile: str) -> Plan:
    """A disaggregated plan of `gpus` one-device instances, `prefill` of them prefill."""
    return Plan(model=model, hardware=hardware, nodes=1, gpus_per_node=gpus, workload=workload,
                ttft_slo=slo.ttft, tpot_slo=slo.tpot, attainment_target=TARGET,
                algorithm="whole", prefill=PhasePlan(1, 1, prefill),
                decode=PhasePlan(1, 1, gpus - prefill), goodput=0.0, goodput_per_gpu=0.0,
                latency_source={"profile": profile})


def phase_scores(problem: Problem, plan: Plan, rate: float, requests: int) -> dict:
    """{phase: {prefill instances: simulated attainment}} at `rate`."""
    total = plan.prefill.instances + plan.decode.instances
    return {ph: split_attainments(problem, plan, total, Lengths(f"{ph}-trace"), rate, requests)
            for ph in PHASES}


def best(scores: dict[int, float]) -> int:
    return max(scores, key=lambda p: (scores[p], -p))


def choose_rate(problem: Problem, plan: Plan, rates, requests: int,
                any_split_for_both: bool = False) -> dict:
    """The static split is the one a plan for the first phase picks (the highest rate at which
    it holds the target on that phase). The rate: the highest at which that split holds the
    target on the first phase, another split holds it on the second where the static one
    does not (the issue's target), and no one split holds it on both (else a static plan of
    that split would do; `any_split_for_both` drops this last condition: the plan for the
    first phase is still the start); else the one where the second phase's best split gains
    most."""
    table = []
    for rate in rates:
        s = phase_scores(problem, plan, rate, requests)
        table.append({"rate": rate, "scores": s})
        print(f"  {rate:.3g} req/s: " + "; ".join(
            f"{ph} " + ", ".join(f"{p}P {100 * a:.0f}%" for p, a in sorted(s[ph].items()))
            for ph in PHASES), file=sys.stderr, flush=True)
    splits = table[0]["scores"][PHASES[0]]
    goodput = {p: max([r["rate"] for r in table if r["scores"][PHASES[0]][p] >= TARGET], default=0.0)
               for p in splits}
    start = max(goodput, key=lambda p: (goodput[p], -p))
    for row in table:
        first, second = row["scores"][PHASES[0]], row["scores"][PHASES[1]]
        moved = best(second)
        both = [p for p in splits if min(first[p], second[p]) >= TARGET]
        # where one split holds both phases, a static plan of it needs no move: not eligible
        row.update(start=start, moved=moved, gain=second[moved] - second[start],
                   static_for_both=both,
                   eligible=first[start] >= TARGET and moved != start
                   and (any_split_for_both or not both),
                   holds_through=second[moved] >= TARGET > second[start])
    through = [r for r in table if r["eligible"] and r["holds_through"]]
    pick = (max(through, key=lambda r: r["rate"]) if through else
            max([r for r in table if r["eligible"]] or table, key=lambda r: (r["gain"], r["rate"])))
    return {"table": table, "first_phase_goodput": goodput, "pick": pick}


def at_scale(args) -> dict:
    """Part 1: OPT-13B, 8 x A100, the paper's profile."""
    print("at scale (simulated): OPT-13B on 8 A100s", file=sys.stderr)
    slo = SLO(1.0, 0.1)
    problem = Problem(MODELS["facebook/opt-13b"], Cluster(get_hardware("a100-80g"), 1, 8),
                      Lengths("sharegpt-trace"), slo, "distserve", requests=args.requests, jobs=1)
    plan = split_plan("facebook/opt-13b", "a100-80g", 8, 1, slo, "sharegpt-trace", "distserve")
    chosen = choose_rate(problem, plan, list(range(2, 26, 2)), args.requests)
    start = chosen["pick"]["start"]
    start_plan = split_plan("facebook/opt-13b", "a100-80g", 8, start, slo, "sharegpt-trace",
                            "distserve")
    over_time = [shift_over_time(problem, start_plan, rate, args)
                 for rate in [float(r) for r in args.scale_rates.split(",")]]
    return {"model": "facebook/opt-13b", "gpus": 8, "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
            **chosen, "over_time": {"start_split": {"prefill": start, "decode": 8 - start},
                                    "phase_s": args.scale_phase_s,
                                    "adapt_interval": args.scale_interval,
                                    "adapt_window": args.scale_window,
                                    "adapt_min_requests": args.adapt_min_requests,
                                    "runs": over_time}}


def shifting_trace(rate: float, phase_s: float, seed: int) -> tuple[Trace, list[str]]:
    """Poisson arrivals at `rate`: the first phase's lengths for `phase_s`, then the second's."""
    n = max(1, round(rate * phase_s))
    parts = [make_trace(Lengths(f"{ph}-trace"), n, rate, seed + i) for i, ph in enumerate(PHASES)]
    trace = Trace(np.concatenate([parts[0].arrival, parts[1].arrival + phase_s]),
                  np.concatenate([t.input_len for t in parts]),
                  np.concatenate([t.output_len for t in parts]))
    return trace, [ph for ph in PHASES for _ in range(n)]


def shift_over_time(problem: Problem, plan: Plan, rate: float, args) -> dict:
    """The shifting trace simulated whole: the plan's split static, and moved by the
    server's --adapt check (its window, scoring and hysteresis) as the run goes."""
    trace, phases = shifting_trace(rate, args.scale_phase_s, args.seed)
    dep = planned_deployment(problem, plan)
    checks: list = []
    check = window_check(problem, plan, Hysteresis(), args.scale_window, args.adapt_min_requests,
                         checks)
    results = {"static": simulate(trace, dep),
               "adaptive": simulate_adaptive(trace, dep, check, args.scale_interval)}
    switches = results["adaptive"].switches
    results["adaptive"] = results["adaptive"].result
    out = {"rate": rate}
    for name, res in results.items():
        rows = [{"phase": ph, "sent_s": float(t), "ttft": float(ttft), "tpot": float(tpot),
                 "met": all(meets(ttft, tpot, problem.slo.ttft, problem.slo.tpot))}
                for ph, t, ttft, tpot in zip(phases, trace.arrival, res.ttft, res.tpot)]
        out[name] = summarise(rows, problem.slo, args.bin_s)
    out["adaptive"]["switches"] = [{"decided_s": s.decided, "done_s": s.done, "instance": s.instance,
                                    "role": s.role} for s in switches]
    out["adaptive"]["checks"] = [{"at_s": t, "prefill": p, "move": m,
                                  "scores": {str(k): round(v, 4) for k, v in sc.items()}}
                                 for t, p, sc, m in checks]
    print(f"  {rate:g} req/s over time: " + "; ".join(
        f"{name} " + ", ".join(f"{ph} {100 * out[name]['phases'][ph]['attainment']:.1f}%"
                               for ph in PHASES) for name in ("static", "adaptive"))
        + f"; switches at {[round(s.done, 1) for s in switches]} s", file=sys.stderr, flush=True)
    return out


def write_trace(path: pathlib.Path, counts: dict, seed: int) -> list[str]:
    """The run's requests as a JSONL trace (replayed in order): each phase's real prompts."""
    from distserve.bench import longbench, sharegpt
    from distserve.bench.workload import load_tokenizer
    tok = load_tokenizer(None)
    loaders = {"sharegpt": sharegpt.workload, "longbench": longbench.workload}
    phases = []
    with open(path, "w") as f:
        for ph in PHASES:
            for r in loaders[ph](tok, counts[ph], seed).requests:
                f.write(json.dumps({"prompt": r.prompt, "output_len": r.output_len}) + "\n")
                phases.append(ph)
    return phases


def watch_switches(url: str, stop: threading.Event, out: list, speeds: list) -> None:
    """time.monotonic() of each rise of /metrics' role-switch count (seen every 2 s), and each
    change of the model-step speed --adapt measured against the profile: (time, {phase: k})."""
    seen = 0.0
    while not stop.wait(2.0):
        try:
            speed = {}
            for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
                if line.startswith("distserve:role_switches"):
                    n = float(line.rsplit(" ", 1)[1])
                    out.extend([time.monotonic()] * int(n - seen))
                    seen = max(seen, n)
                elif line.startswith("distserve:plan_model_step_speed{"):
                    speed[line.split('phase="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
            if speed and (not speeds or speeds[-1][1] != speed):
                speeds.append((time.monotonic(), speed))
        except httpx.HTTPError:
            pass


def serve_and_measure(name: str, flags: list[str], trace: pathlib.Path, rate: float,
                      slo: SLO, work: pathlib.Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"  {name}: serve {' '.join(flags)}", file=sys.stderr, flush=True)
    proc = start_server(flags, port, work / f"server-{name}.log")
    switches: list = []
    speeds: list = []
    stop = threading.Event()
    try:
        watcher = threading.Thread(target=watch_switches, args=(url, stop, switches, speeds))
        watcher.start()
        result = work / f"bench-{name}.json"
        cmd = [sys.executable, "-m", "distserve.cli", "bench", "--base-url", url, "--dataset",
               "jsonl", "--dataset-path", str(trace), "--request-rate", f"{rate:.6g}",
               "--ttft-slo", f"{slo.ttft:g}", "--tpot-slo", f"{slo.tpot:g}", "--ignore-eos",
               "--disable-tqdm", "--save-result", str(result)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        ended = time.monotonic()
        if done.returncode != 0:
            raise RuntimeError(f"bench failed: {done.stderr[-2000:]}")
    finally:
        stop.set()
        stop_server(proc)
    doc = json.loads(result.read_text())
    first_send = ended - doc["duration"]   # its duration runs from the first send to the end
    log = (work / f"server-{name}.log").read_text()
    moves = [line for line in log.splitlines() if "becomes a" in line]
    return {"records": doc["requests"], "switch_log": moves,
            "switch_times_s": [round(t - first_send, 1) for t in switches],
            "measured_speed": [{"at_s": round(t - first_send, 1), **k} for t, k in speeds]}


def per_request(records: list, phases: list[str], slo: SLO) -> list[dict]:
    rows = []
    for rec, ph in zip(records, phases):
        tpot = rec.get("tpot")
        ok = rec["success"] and all(meets(rec["ttft"], tpot, slo.ttft, slo.tpot))
        rows.append({"phase": ph, "sent_s": rec["send_time"], "met": bool(ok),
                     "ttft": rec["ttft"], "tpot": tpot})
    return rows


def summarise(rows: list[dict], slo: SLO, bin_s: float) -> dict:
    """Per phase: attainment, the requests that missed each SLO, and goodput (requests meeting
    both SLOs per second between the phase's first and last send); attainment in bins of
    sending time."""
    phases = {}
    for ph in PHASES:
        mine = [r for r in rows if r["phase"] == ph]
        if not mine:
            continue
        span = max(r["sent_s"] for r in mine) - min(r["sent_s"] for r in mine)
        met = sum(r["met"] for r in mine)
        verdicts = [meets(r["ttft"], r["tpot"], slo.ttft, slo.tpot) for r in mine]
        phases[ph] = {"requests": len(mine), "attainment": met / len(mine),
                      "goodput": met / span if span > 0 else None,
                      "ttft_misses": sum(not ok[0] for ok in verdicts),
                      "tpot_misses": sum(not ok[1] for ok in verdicts),
                      "starts_s": min(r["sent_s"] for r in mine)}
    end = max(r["sent_s"] for r in rows)
    bins = []
    for lo in np.arange(0.0, end + bin_s, bin_s):
        inside = [r["met"] for r in rows if lo <= r["sent_s"] < lo + bin_s]
        if inside:
            bins.append({"from_s": float(lo), "requests": len(inside),
                         "attainment": sum(inside) / len(inside)})
    return {"phases": phases, "over_time": bins}


def real(args) -> dict:
    """Part 2: three one-thread SmolLM2 instances on this machine."""
    print("on this machine: SmolLM2, 3 one-thread instances", file=sys.stderr)
    slo = SLO(args.ttft_slo, args.tpot_slo)
    gpus = 3
    problem = Problem(get_model(SMOLLM2), Cluster(get_hardware("cpu"), 1, gpus),
                      Lengths("sharegpt-trace"), slo, args.latency_profile,
                      requests=args.requests, jobs=1,
                      speed=parse_speed(args.speed) if args.speed else None)
    probe = split_plan(SMOLLM2, "cpu", gpus, 1, slo, "sharegpt-trace", args.latency_profile)
    rates = [args.rate] if args.rate else [float(r) for r in args.rates.split(",")]
    chosen = choose_rate(problem, probe, rates, args.requests, args.any_split_for_both)
    pick = chosen["pick"]
    rate, start = pick["rate"], pick["start"]
    plan = split_plan(SMOLLM2, "cpu", gpus, start, slo, "sharegpt-trace", args.latency_profile)
    out = {"model": SMOLLM2, "instances": gpus, "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
           "latency_profile": args.latency_profile, "speed": problem.speed, **chosen, "rate": rate,
           "start_split": {"prefill": start, "decode": gpus - start}}
    if args.skip_real:
        return out
    work = pathlib.Path(tempfile.mkdtemp(prefix="adaptive-"))
    plan.save(str(work / "plan.yaml"))
    counts = {ph: max(10, round(rate * args.phase_s)) for ph in PHASES}
    phases = write_trace(work / "trace.jsonl", counts, args.seed)
    common = ["--plan", str(work / "plan.yaml"), "--kv-cache-memory", "1", "--no-pin-cpus"]
    adapt = ["--adapt", "--adapt-interval", f"{args.adapt_interval:g}", "--adapt-window",
             f"{args.adapt_window:g}", "--adapt-min-requests", str(args.adapt_min_requests)]
    out["runs"] = {}
    for name, flags in (("static", common), ("adaptive", common + adapt)):
        run = serve_and_measure(name, flags, work / "trace.jsonl", rate, slo, work)
        rows = per_request(run["records"], phases, slo)
        out["runs"][name] = {"flags": flags, **summarise(rows, slo, args.bin_s),
                             "switch_times_s": run["switch_times_s"],
                             "measured_speed": run["measured_speed"],
                             "switch_log": run["switch_log"], "requests": rows}
        print(f"  {name}: " + ", ".join(
            f"{ph} {100 * s['attainment']:.0f}%" for ph, s in out["runs"][name]["phases"].items())
            + f"; switches at {run['switch_times_s']}", file=sys.stderr, flush=True)
    out["counts"] = counts
    return out


def plot(doc: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = doc["real"]["runs"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, style in (("static", "o-"), ("adaptive", "s-")):
        bins = runs[name]["over_time"]
        ax.plot([b["from_s"] + doc["args"]["bin_s"] / 2 for b in bins],
                [100 * b["attainment"] for b in bins], style, label=name)
        for t in runs[name]["switch_times_s"]:
            ax.axvline(t, color="C1", ls=":", lw=1)
    shift = runs["static"]["phases"][PHASES[1]]["starts_s"]
    ax.axvline(shift, color="grey", ls="--", lw=1)
    ax.text(shift, 5, f" {PHASES[1]} prompts from here", color="grey")
    ax.axhline(100 * TARGET, color="k", lw=0.5)
    ax.set_xlabel("request sent at (s)")
    ax.set_ylabel("requests meeting both SLOs (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"SmolLM2, 3 one-thread instances, {doc['real']['rate']:.3g} req/s: "
                 "static plan vs --adapt (dotted: switches)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_at_scale(doc: dict, path: pathlib.Path) -> None:
    """Attainment over time of the simulated shifting trace, static against --adapt, a panel
    per rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = doc["at_scale"]["over_time"]
    runs, bin_s = scale["runs"], doc["args"]["bin_s"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.2 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        for name, style in (("static", "o-"), ("adaptive", "s-")):
            bins = run[name]["over_time"]
            ax.plot([b["from_s"] + bin_s / 2 for b in bins], [100 * b["attainment"] for b in bins],
                    style, ms=3, label=f"{name} ({100 * run[name]['phases'][PHASES[1]]['attainment']:.0f}% "
                    f"after the shift)")
        for s in run["adaptive"]["switches"]:
            ax.axvline(s["done_s"], color="C1", ls=":", lw=1)
        ax.axvline(scale["phase_s"], color="grey", ls="--", lw=1)
        ax.axhline(100 * TARGET, color="k", lw=0.5)
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{run['rate']:g} req/s\n% met")
        ax.legend(fontsize=7, loc="lower left")
    start = scale["start_split"]
    axes[0, 0].set_title(f"OPT-13B, 8 A100s (simulated): {start['prefill']}P{start['decode']}D "
                         f"static vs --adapt; LongBench-like from {scale['phase_s']:g} s "
                         "(dotted: switches)", fontsize=9)
    axes[-1, 0].set_xlabel("request sent at (s)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-profile", default=str(RESULTS / "profile_smollm2_avx2.json"),
                    help="this machine's profile of SmolLM2 (distserve profile)")
    ap.add_argument("--ttft-slo", type=float, default=20.0,
                    help="seconds (about 2.5 x a LongBench-like prompt's prefill, one thread here)")
    ap.add_argument("--tpot-slo", type=float, default=0.05,
                    help="seconds (about 2 x the single-request decode step, one thread here)")
    ap.add_argument("--speed", default=None, help="K or PREFILL:DECODE: the profile's step "
                    "times x K for choosing the rate and the start (what three instances on two "
                    "cores run at; the server's --adapt measures its own)")
    ap.add_argument("--rates", default="0.05,0.075,0.1,0.125,0.15",
                    help="rates the real run's rate is chosen from (req/s)")
    ap.add_argument("--rate", type=float, default=None, help="the real run's rate (req/s)")
    ap.add_argument("--phase-s", type=float, default=300.0, help="seconds of each phase")
    ap.add_argument("--any-split-for-both", action="store_true", help="choose the real run's "
                    "rate even where one split would hold both phases (the start is still the "
                    "plan for the first phase, as at scale)")
    ap.add_argument("--adapt-interval", type=float, default=15.0)
    ap.add_argument("--adapt-window", type=float, default=150.0)
    ap.add_argument("--adapt-min-requests", type=int, default=8)
    ap.add_argument("--bin-s", type=float, default=30.0)
    ap.add_argument("--requests", type=int, default=300, help="requests per simulation")
    ap.add_argument("--scale-rates", default="12,13,14,16,18,20",
                    help="rates (req/s) of the simulated shifting trace at scale")
    ap.add_argument("--scale-phase-s", type=float, default=600.0,
                    help="seconds of each phase of the simulated trace")
    ap.add_argument("--scale-interval", type=float, default=15.0,
                    help="seconds between the simulated --adapt checks")
    ap.add_argument("--scale-window", type=float, default=60.0,
                    help="the simulated --adapt-window (s): 60 s at 12-20 req/s hold 700-1200 "
                    "finished requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true", help="only choose the real run's rate")
    ap.add_argument("--only-at-scale", action="store_true", help="redo the simulation at scale "
                    "and keep the rest of --out as it is")
    ap.add_argument("-o", "--out", default=str(RESULTS / "adaptive.json"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if args.only_at_scale:
        doc = json.loads(out.read_text())
        doc["at_scale"] = at_scale(args)
        doc.setdefault("args", {}).update({k: v for k, v in vars(args).items() if k.startswith("scale_")})
        out.write_text(json.dumps(doc, indent=1))
        plot_at_scale(doc, out.with_name(out.stem + "_at_scale.png"))
        return 0
    doc = {"args": vars(args), "at_scale": at_scale(args), "real": real(args)}
    out.write_text(json.dumps(doc, indent=1))
    plot_at_scale(doc, out.with_name(out.stem + "_at_scale.png"))
    if "runs" in doc["real"]:
        plot(doc, out.with_suffix(".png"))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
