"""`distserve tune`: the planner checked against the real deployment on this machine, refitted
and re-planned until its plan stops changing.

One round: plan (the whole-deployment search, on this machine's cores, from the latency
profile at the speed the last round measured), serve the plan (`distserve serve --plan`, its
instances writing step traces), load it with `distserve bench` at rates around the predicted
goodput, simulate exactly the arrivals and lengths each run sent (the prediction), and set
measured beside predicted attainment, rate by rate. The instances' step traces say how much
slower than the profile their model steps ran, per phase; the next round plans at that speed.
The loop ends when a round's plan is the last one's, or after `rounds`. Ctrl-C stops the
server and leaves the report of the rounds done. Everything it runs is our own CLI, so what
it measures is what a user's deployment does.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from distserve.cluster.step_trace import ENV as STEP_TRACE_ENV
from distserve.planner.calibration import speed_of_traces
from distserve.planner.error_bars import fit_error, fit_widths, inside, prediction_band, speed_spread
from distserve.planner.goodput import HORIZONS, SLO, _lifetime
from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.models import built_in_spec, get_model
from distserve.planner.planning import make_plan, planned_deployment
from distserve.planner.reality_check import replay, runs_of, trace_of
from distserve.planner.search import Problem
from distserve.planner.step_traces import read_traces, run_speed, summarise
from distserve.planner.workload import TRACES, Lengths
from distserve.tune.serve import free_port, start_server, stop_server

RATE_FACTORS = (0.5, 0.8, 1.0, 1.25, 1.5)   # around the predicted goodput
ACCURACY_PP = 3.0   # |predicted - measured| attainment, in points, that counts as holding


@dataclass
class TuneConfig:
    model: str | None                      # served: a folder, a .gguf, or None (built-in)
    workload: str                          # a bench dataset the planner also knows
    ttft_slo: float
    tpot_slo: float
    out: pathlib.Path
    latency_profile: str | None = None     # None: profile this machine first
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    rounds: int = 2
    num_rates: int = 3
    num_prompts: int = 60
    repeats: int = 1                       # runs of each rate's trace (2+: reality's spread)
    plan_requests: int = 400
    band_seeds: int = 5                    # resampled traces per rate for the seed band
    seed: int = 0
    speed: dict | None = None              # the first round's speed x the profile (None: 1)
    profile_args: tuple = ("--batch-sizes", "1,2,4,8,16", "--repeats", "2")


def served_spec(model: str | None):
    """The planner's spec of the served model (the built-in one is SmolLM2-135M)."""
    return get_model(model) if model else built_in_spec()


def planned_model_name(model: str | None) -> str:
    return served_spec(model).name


def profiled_lengths(workload: str) -> tuple[str, str]:
    """(--prefill-lens, --context-lens) for the profile: doubling lengths up to the workload's
    99th-percentile prompt and prompt + output, so the latency model is fitted over the shapes
    the deployment will run rather than extrapolated (attention grows with the square)."""
    inputs, outputs = planned_lengths(workload).sample(4000, np.random.default_rng(0))
    top_in = max(512, int(np.percentile(inputs, 99)))
    top_ctx = max(256, int(np.percentile(inputs + outputs, 99)))
    prefill = [n for n in (16, 64, 256, 512, 1024) if n < top_in] + [top_in]
    context = [n for n in (64, 256, 1024) if n < top_ctx] + [top_ctx]
    return ",".join(map(str, prefill)), ",".join(map(str, context))


def profile_machine(cfg: TuneConfig, progress) -> str:
    path = cfg.out / "profile.json"
    prefill_lens, context_lens = profiled_lengths(cfg.workload)
    cmd = [sys.executable, "-m", "distserve.cli", "profile", *([cfg.model] if cfg.model else []),
           "-o", str(path), "--name", planned_model_name(cfg.model), "--num-threads", "1",
           "--clock", "cpu", "--prefill-lens", prefill_lens, "--context-lens", context_lens,
           *cfg.profile_args]
    progress(f"profiling this machine: {' '.join(cmd[3:])}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"distserve profile failed:\n{done.stderr[-2000:]}")
    return str(path)


def planned_lengths(workload: str) -> Lengths:
    """What the bench will send: the lengths its loaders measured on the real prompts (the
    planner's `-trace` workloads), else the planner's synthetic distribution of that name."""
    trace = f"{workload}-trace"
    return Lengths(trace if trace in TRACES else workload)


def problem_for(cfg: TuneConfig, profile: str, speed: dict | None) -> Problem:
    return Problem(served_spec(cfg.model),
                   Cluster(get_hardware("cpu"), 1, cfg.cores), planned_lengths(cfg.workload),
                   SLO(cfg.ttft_slo, cfg.tpot_slo), profile, requests=cfg.plan_requests,
                   seeds=(0, 1), jobs=1, speed=speed)


def plan_key(plan) -> tuple:
    """What makes two plans the same deployment."""
    c = plan.colocated or {}
    return (plan.mode, plan.prefill.tp, plan.prefill.pp, plan.prefill.instances, plan.decode.tp,
            plan.decode.pp, plan.decode.instances) if plan.mode == "disaggregated" else \
        (plan.mode, c.get("tp"), c.get("pp"), c.get("instances"))


def accuracy(row: dict, repeats: list[float]) -> dict:
    """The criterion: |predicted - measured| <= max(3 points, the measured run-to-run spread
    of the same trace), per rate; the spread is unknown (None) without repeats."""
    measured = [row["measured"]["attainment"], *repeats]
    spread = 100 * (max(measured) - min(measured)) if repeats else None
    bound = max(ACCURACY_PP, spread or 0.0)
    return {"repeats": repeats, "spread_pp": spread, "bound_pp": bound,
            "holds": abs(row["error_pp"]) <= bound}


def prompts_for(cfg: TuneConfig, p: Problem, rate: float) -> int:
    """Requests for a measured run: at least `num_prompts`, and enough for the run to span a
    few request lifetimes (as the planner's goodput does: a shorter run measures a burst, which
    looks better than the steady state), at most 5 x `num_prompts`."""
    need = math.ceil(HORIZONS * rate * _lifetime(p.lengths, p.slo))
    return int(min(max(cfg.num_prompts, need), 5 * cfg.num_prompts))


def bench(cfg: TuneConfig, port: int, rate: float, seed: int, path: pathlib.Path,
          num_prompts: int) -> dict:
    cmd = [sys.executable, "-m", "distserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
           "--dataset", cfg.workload, "--request-rate", f"{rate:.6g}", "--num-prompts",
           str(num_prompts), "--seed", str(seed), "--ttft-slo", f"{cfg.ttft_slo:g}",
           "--tpot-slo", f"{cfg.tpot_slo:g}", "--ignore-eos", "--disable-tqdm",
           "--save-result", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"distserve bench at {rate:g} req/s failed:\n{done.stdout[-2000:]}")
    return json.loads(path.read_text())


def alternative_of(plan):
    """The deployment the plan is compared with: the best colocated one beside a disaggregated
    plan, the best disaggregated one beside a colocated plan; None when the search found none."""
    if plan.mode == "disaggregated":
        return replace(plan, mode="colocated") if plan.colocated else None
    return replace(plan, mode="disaggregated") if plan.prefill.instances and plan.decode.instances else None


def band_of(p: Problem, plan, trace, rate: float, slo: dict, widths: dict, seeds) -> dict:
    """The predicted band of `plan` on a run's trace (distserve.planner.error_bars), its
    deployment rebuilt at any speed from the problem the round planned with."""
    return prediction_band(trace, lambda s: planned_deployment(replace(p, speed=s), plan), p.speed,
                           widths, rate, slo, seeds)


def speeds_by_run(folder: pathlib.Path, entry, windows: list, speed: dict | None) -> list[dict]:
    """Per measured run (a (start, end) monotonic window), the speed its model steps ran at x
    the profile, per phase that ran steps: the machine's run-to-run speed, which widens the
    next round's fit band."""
    out = []
    for start, end in windows:
        summary = summarise(read_traces(folder, start, end), entry, 0.0)
        out.append({phase: round(v * (speed or {}).get(phase, 1.0), 4)
                    for phase, v in run_speed(summary).items()
                    if sum(s[f"{phase}_profile_ms_total"] for s in summary.values())})
    return out


def run_round(cfg: TuneConfig, k: int, profile: str, speed: dict | None, progress,
              last_speeds: list | None = None) -> dict:
    p = problem_for(cfg, profile, speed)
    progress(f"round {k}: planning on {cfg.cores} core(s)"
             + (f" at the measured speed {speed}" if speed else "") + " ...")
    plan = make_plan(p, "whole", cfg.workload)
    plan_path = cfg.out / f"plan-round{k}.yaml"
    plan.save(str(plan_path))
    predicted_goodput = (plan.goodput if plan.mode == "disaggregated"
                         else plan.colocated.get("goodput", plan.goodput))
    progress(f"round {k}: {plan.mode} plan, predicted goodput {predicted_goodput:.3g} req/s; "
             "serving it")
    rates = [f * predicted_goodput for f in RATE_FACTORS[:cfg.num_rates]]
    fit, spread = fit_error(profile, planned_model_name(cfg.model)), speed_spread(last_speeds or [])
    widths, seeds = fit_widths(fit, spread), range(1000, 1000 + cfg.band_seeds)
    alt = alternative_of(plan)
    traces = cfg.out / f"traces-round{k}"
    port = free_port()
    env = {**os.environ, STEP_TRACE_ENV: str(traces)}
    flags = [*([cfg.model] if cfg.model else []), "--plan", str(plan_path), "--no-pin-cpus"]
    proc = start_server(flags, port, cfg.out / f"serve-round{k}.log", env=env)
    runs, windows = [], []
    try:
        dep = planned_deployment(p, plan)
        slo = {"ttft": cfg.ttft_slo, "tpot": cfg.tpot_slo}
        for i, rate in enumerate(rates):
            n = prompts_for(cfg, p, rate)
            start = time.monotonic()
            doc = bench(cfg, port, rate, cfg.seed + i, cfg.out / f"bench-round{k}-{i}.json", n)
            windows.append((start, time.monotonic()))
            row = replay(doc, dep, slo)[0]
            row["rate"] = rate
            # the same arrivals and prompts again, straight after: reality's own spread
            again = []
            for j in range(1, cfg.repeats):
                start = time.monotonic()
                again.append(bench(cfg, port, rate, cfg.seed + i,
                                   cfg.out / f"bench-round{k}-{i}-{j}.json", n)["slo_attainment"])
                windows.append((start, time.monotonic()))
            row |= accuracy(row, again)
            trace, _ = trace_of(runs_of(doc)[0])
            row["band"] = band_of(p, plan, trace, rate, slo, widths, seeds)
            row["inside"] = inside(row["band"], row["measured"]["attainment"])
            if alt is not None:
                row["alternative"] = band_of(p, alt, trace, rate, slo, widths, seeds)
            runs.append(row)
            b = row["band"]
            progress(f"round {k}: {rate:.3g} req/s: measured {100 * row['measured']['attainment']:.1f}% "
                     f"attainment, predicted {100 * row['predicted']['attainment']:.1f}% "
                     f"[{100 * b['low']:.1f}, {100 * b['high']:.1f}]")
    finally:
        stop_server(proc)
    measured_speed, by_run = None, []
    try:   # against the entry this round planned with: the profile at `speed` already
        entry = p.instance(1, 1).latency.entry
        relative = speed_of_traces(str(traces), entry)
        measured_speed = {phase: round(float(v) * (speed or {}).get(phase, 1.0), 3)
                          for phase, v in relative.items()}
        by_run = speeds_by_run(traces, entry, windows, speed)
    except (ValueError, FileNotFoundError) as e:
        progress(f"round {k}: no speed from the step traces ({e})")
    return {"round": k, "plan": plan.to_dict(), "plan_key": list(plan_key(plan)),
            "predicted_goodput": predicted_goodput, "speed_planned": speed,
            "speed_measured": measured_speed, "speed_by_run": by_run,
            "band": {"fit_error": fit, "speed_spread": spread, "widths": widths,
                     "seeds": cfg.band_seeds,
                     "alternative": None if alt is None else _plan_name(alt)},
            "runs": runs}


def _plan_name(plan) -> str:
    """A plan's deployment in a few words, for the report's comparison column."""
    if plan.mode == "colocated":
        c = plan.colocated
        return f"colocated {c.get('instances') or 1} x (TP {c['tp']}, PP {c['pp']})"
    return (f"disaggregated {plan.prefill.instances}P (TP {plan.prefill.tp}, PP {plan.prefill.pp}) + "
            f"{plan.decode.instances}D (TP {plan.decode.tp}, PP {plan.decode.pp})")


def tune(cfg: TuneConfig, progress=lambda msg: None) -> dict:
    """The rounds (see the module docstring); writes the report into cfg.out as it goes."""
    from distserve.tune.report import write_report
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc = {"model": planned_model_name(cfg.model), "workload": cfg.workload,
           "ttft_slo": cfg.ttft_slo, "tpot_slo": cfg.tpot_slo, "cores": cfg.cores,
           "rounds": [], "stopped": "rounds"}
    try:
        profile = cfg.latency_profile or profile_machine(cfg, progress)
        doc["latency_profile"] = profile
        speed = cfg.speed
        for k in range(1, cfg.rounds + 1):
            last = doc["rounds"][-1]["speed_by_run"] if doc["rounds"] else None
            r = run_round(cfg, k, profile, speed, progress, last)
            doc["rounds"].append(r)
            write_report(doc, cfg.out)
            if k > 1 and r["plan_key"] == doc["rounds"][-2]["plan_key"]:
                doc["stopped"] = "converged"
                break
            speed = r["speed_measured"] or speed
    except KeyboardInterrupt:
        doc["stopped"] = "interrupted"
    doc["seconds"] = round(time.time() - started, 1)
    if doc["rounds"]:
        final = doc["rounds"][-1]["plan"]
        (cfg.out / "plan.yaml").write_text(_yaml(final))
    write_report(doc, cfg.out)
    return doc


def _yaml(plan: dict) -> str:
    import yaml
    return yaml.safe_dump(plan, sort_keys=False)

