"""Plans for today's GPUs: Llama-3.1-8B on 8 H100s and Qwen3-32B on 8 H200s, long prompts,
two SLO settings; the step latencies the planner predicts beside the published measurements
its Hopper factors were fitted to; writes docs/hopper-plans.md and a JSON.

    python benchmarks/hopper_plans.py [--requests 1000] [--out benchmarks/results/hopper_plans.json]

A thin driver of the planner (distserve.planner): whole-deployment search, the colocated
alternative, the verdict.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from distserve.planner.goodput import SLO
from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.latency import instance_latency
from distserve.planner.measured import BUILTIN_TABLES, read_table
from distserve.planner.models import get_model
from distserve.planner.planning import make_plan
from distserve.planner.roofline import calibrate
from distserve.planner.search import Problem
from distserve.planner.workload import Lengths

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES = [  # model, hardware, workload, TTFT, TPOT
    ("meta-llama/Llama-3.1-8B", "h100-80g", "fixed:4000:500", 1.0, 0.02),
    ("meta-llama/Llama-3.1-8B", "h100-80g", "fixed:4000:1000", 0.6, 0.05),
    ("Qwen/Qwen3-32B", "h200", "fixed:4000:500", 1.0, 0.02),
    ("Qwen/Qwen3-32B", "h200", "fixed:4000:1000", 0.6, 0.05),
]


def step_ms(row: dict, factors: str) -> float:
    """A measured row's step as the planner predicts it: with the Hopper factors, or with the
    A100 (OPT) calibration alone."""
    hw = row["hardware"] if factors == "hopper" else get_hardware("a100-80g")
    lat = instance_latency(row["model"], row["tp"], row["pp"], "distserve", hw)
    if factors != "hopper":   # the A100-calibrated roofline at Hopper's peaks (the old answer)
        from distserve.planner.roofline import roofline_entry
        lat = type(lat)(roofline_entry(row["model"], row["hardware"], row["tp"],
                                       theta=calibrate("distserve")), row["tp"], row["pp"])
    if row["phase"] == "prefill":
        return lat.prefill([row["tokens"]] * row["batch"]) * 1e3
    return lat.decode([row["tokens"]] * row["batch"]) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/hopper_plans.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs/hopper-plans.md"))
    args = ap.parse_args(argv)
    steps = [{"model": r["model"].name, "tp": r["tp"], "phase": r["phase"], "batch": r["batch"],
              "tokens": r["tokens"], "measured_ms": r["latency_ms"], "source": r["source"],
              "predicted_ms": round(step_ms(r, "hopper"), 2),
              "a100_calibration_ms": round(step_ms(r, "a100"), 2)}
             for r in read_table(BUILTIN_TABLES["hopper"])]
    plans = []
    for model, hw, workload, ttft, tpot in CASES:
        start = time.perf_counter()
        p = Problem(get_model(model), Cluster(get_hardware(hw), 1, 8), Lengths(workload),
                    SLO(ttft, tpot), requests=args.requests, seeds=(0, 1))
        plan = make_plan(p, "whole", workload)
        c = plan.colocated or {}
        ctp = c.get("tp") or 1
        prompt = int(workload.split(":")[1])
        stall = instance_latency(p.model, ctp, 1, "distserve", p.hw).prefill([prompt]) * 1e3
        plans.append({"colocated_prefill_ms": round(stall, 1),"model": model, "hardware": hw, "workload": workload, "ttft_slo": ttft,
                      "tpot_slo": tpot, "prefill": vars(plan.prefill), "decode": vars(plan.decode),
                      "num_gpus": plan.num_gpus, "goodput": plan.goodput,
                      "goodput_per_gpu": plan.goodput_per_gpu, "mode": plan.mode,
                      "colocated": {k: c.get(k) for k in ("tp", "pp", "instances", "goodput_per_gpu")},
                      "verdict": plan.verdict, "latency_source": plan.latency_source,
                      "seconds": round(time.perf_counter() - start, 1)})
        print(f"{model} on 8 x {hw}, {workload}, TTFT {ttft} s / TPOT {tpot} s: "
              f"{plan.prefill.instances} x P(TP {plan.prefill.tp}) + {plan.decode.instances} x "
              f"D(TP {plan.decode.tp}, PP {plan.decode.pp}), {plan.goodput:.3g} req/s; "
              f"{plan.verdict}", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": steps, "plans": plans}, indent=2))
    pathlib.Path(args.doc).write_text(render(steps, plans))
    print(f"saved {out} and {args.doc}")
    return 0


def render(steps: list[dict], plans: list[dict]) -> str:
    lines = ["# Plans for Hopper GPUs", "",
             "Made by `python benchmarks/hopper_plans.py` ([results](../benchmarks/results/"
             "hopper_plans.json)). The roofline's efficiency factors for Hopper are fitted on the "
             "measured steps below (`distserve/planner/data/measured-hopper.csv`, the public vLLM "
             "measurements quoted in issue 17); H200 shares them with its own peaks. There are no "
             "published Qwen3-32B steps in the table, so its latencies are the fitted roofline's, "
             "not checked against a measurement.", "",
             "## Step latencies: predicted beside measured", "",
             "| model | TP | step | measured | predicted (Hopper factors) | A100 calibration alone |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        what = (f"prefill of {s['batch']} x {s['tokens']} tokens" if s["phase"] == "prefill"
                else f"decode, batch {s['batch']}, context {s['tokens']}")
        lines.append(f"| {s['model']} | {s['tp']} | {what} | {s['measured_ms']} ms | "
                     f"{s['predicted_ms']} ms | {s['a100_calibration_ms']} ms |")
    lines += ["", "## Plans (8 GPUs, whole-deployment search)", "",
              "| model | GPUs | workload | SLO TTFT / TPOT | plan | goodput | colocated "
              "alternative | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in plans:
        pf, dc, c = p["prefill"], p["decode"], p["colocated"]
        plan = (f"{pf['instances']} x prefill (TP {pf['tp']}, PP {pf['pp']}) + {dc['instances']} x "
                f"decode (TP {dc['tp']}, PP {dc['pp']}) = {p['num_gpus']} GPUs")
        colo = (f"{c['instances']} x (TP {c['tp']}, PP {c['pp']}): {c['goodput_per_gpu']:.3g} "
                "req/s/GPU" if c.get("tp") else "none meets the SLOs")
        lines.append(f"| {p['model']} | 8 x {p['hardware']} | {p['workload']} | "
                     f"{p['ttft_slo'] * 1e3:.0f} ms / {p['tpot_slo'] * 1e3:.0f} ms | {plan} | "
                     f"{p['goodput']:.3g} req/s ({p['goodput_per_gpu']:.3g}/GPU) | {colo} | "
                     f"{p['verdict']} |")
    lines += ["", "Why, case by case: a colocated instance that prefills a prompt between two "
              "decode steps adds that prefill to the step of every request it is decoding.", ""]
    for p in plans:
        ms, tpot = p["colocated_prefill_ms"], p["tpot_slo"] * 1e3
        out_len = int(p["workload"].split(":")[2])
        why = (f"one prompt's prefill takes {ms:.0f} ms on the colocated (TP {p['colocated'].get('tp')}) "
               f"instance, {ms / tpot:.1f}x the {tpot:.0f} ms TPOT SLO: every prefill breaks "
               "TPOT for the requests decoding beside it, so the phases are split")
        if p["mode"] == "colocated" or p["verdict"].startswith("either"):
            why = (f"one prompt's prefill takes {ms:.0f} ms against a {tpot:.0f} ms TPOT SLO "
                   f"spread over {out_len} output tokens: the stalls fit the SLO's slack, and "
                   "replicas that do both phases use every GPU for the longer decode phase, so "
                   "disaggregation gains little or loses")
        lines.append(f"- {p['model']}, {p['workload']}, TPOT {tpot:.0f} ms: {why}.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
