"""Text and JSON reports of `plan` and `simulate`: what a person reads, what a script parses."""
from __future__ import annotations

import math
import time

import numpy as np

from distserve.planner.goodput import capacity_guess, goodput
from distserve.planner.plan import Plan
from distserve.planner.simulator import Colocated, Disaggregated, simulate
from distserve.planner.workload import make_trace


def _ms(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x * 1e3:.0f} ms"


def format_plan(plan: Plan, top: int = 12, saved: bool = True) -> str:
    """The plan as text; `saved`: whether the whole plan (every candidate) went to a file."""
    p, d = plan.prefill, plan.decode
    lines = [
        f"Plan: {plan.model} on {plan.nodes} x {plan.gpus_per_node} {plan.hardware}, workload "
        f"{plan.workload}, SLO TTFT {_ms(plan.ttft_slo)} / TPOT {_ms(plan.tpot_slo)} for "
        f"{plan.attainment_target:.0%} ("
        + ("whole-deployment search" if plan.algorithm == "whole" else f"{plan.algorithm} node affinity")
        + ")",
        f"  prefill: {p.instances} x (TP {p.tp}, PP {p.pp})   decode: {d.instances} x (TP {d.tp}, "
        f"PP {d.pp})   GPUs: {plan.num_gpus}",
        f"  predicted goodput: {plan.goodput:.3g} req/s = {plan.goodput_per_gpu:.3g} req/s per GPU "
        f"(std {plan.goodput_spread:.2g} over seeds)",
    ]
    by_node: dict = {}
    for x in plan.placement:
        by_node.setdefault(x["node"], []).append(f"{x['instance']}[stage {x['stage']}] GPUs {x['gpus']}")
    for node, items in sorted(by_node.items()):
        lines.append(f"  node {node}: " + "; ".join(items))
    if plan.colocated:
        c = plan.colocated
        count = f"{c['instances']} x " if "instances" in c else ""
        lines.append(f"  colocated alternative: {count}(TP {c['tp']}, PP {c['pp']}): "
                     f"{c['goodput_per_gpu']:.3g} req/s per GPU (profile {c['profile']})")
    if plan.verdict:
        lines.append(f"  verdict: {plan.verdict}")
    sims = f" ({plan.simulations} whole deployments simulated)" if plan.simulations else ""
    lines.append(f"  search: {plan.search_seconds:.1f} s{sims}; latency: prefill {plan.latency_source.get('prefill')}, "
                 f"decode {plan.latency_source.get('decode')} ({plan.latency_source.get('profile')})")
    lines.append("Candidates considered (best first):")
    rows = sorted(plan.candidates, key=lambda r: -(r.get("goodput_per_gpu") or -1))
    for r in rows[:top]:
        lines.append("  " + _candidate_row(r))
    if len(rows) > top:
        lines.append(f"  ... {len(rows) - top} more " + ("in the plan file" if saved else
                                                         "(all of them with -o plan.yaml or --json)"))
    return "\n".join(lines)


def _candidate_row(r: dict) -> str:
    per = r.get("goodput_per_gpu")
    per_s = "pruned" if per is None else f"{per:.3g} req/s/GPU"
    if "phase" in r:
        return f"{r['phase']:7s} TP {r['tp']} PP {r['pp']}: {r['goodput']:.3g} req/s, {per_s}"
    pf, dc = r["prefill"], r["decode"]
    bound = r.get("bound_per_gpu")
    return (f"prefill TP {pf['tp']} PP {pf['pp']} + decode TP {dc['tp']} PP {dc['pp']} "
            f"({r['segments']} node(s), {r['num_gpus']} GPUs): {per_s}"
            + ("" if bound is None else f" (bound {bound:.3g})"))


def deployment_from_args(problem, args):
    """The deployment `simulate` was asked about: a plan file, or the flags."""
    if args.plan:
        plan = Plan.load(args.plan)
        pf, dc = plan.prefill, plan.decode
        link = problem.hw.link_bandwidth if args.link_bandwidth is None else args.link_bandwidth * 1e9
        return Disaggregated(problem.instance(pf.tp, pf.pp), problem.instance(dc.tp, dc.pp),
                             pf.instances, dc.instances, problem.model.kv_bytes_per_token, link)
    if args.mode == "colocated":
        if args.instances < 1:
            raise ValueError(f"--instances must be >= 1, got {args.instances}")
        return Colocated(problem.instance(args.tp, args.pp), args.instances, args.chunked_prefill)
    if args.prefill_instances < 1 or args.decode_instances < 1:
        raise ValueError("--prefill-instances and --decode-instances must be >= 1")
    link = problem.hw.link_bandwidth if args.link_bandwidth is None else args.link_bandwidth * 1e9
    return Disaggregated(problem.instance(args.prefill_tp, args.prefill_pp),
                         problem.instance(args.decode_tp, args.decode_pp), args.prefill_instances,
                         args.decode_instances, problem.model.kv_bytes_per_token, link)


def _check(problem, dep) -> None:
    from distserve.planner.memory import check_parallelism
    insts = [dep.prefill, dep.decode] if isinstance(dep, Disaggregated) else [dep.instance]
    for inst in insts:
        why = check_parallelism(problem.model, problem.hw, inst.latency.tp, inst.latency.pp, 1)
        if why:
            raise ValueError(why)


def _pcts(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if not len(x):
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    return {"mean": float(x.mean()), **{f"p{q}": float(np.percentile(x, q)) for q in (50, 90, 99)}}


def _write_requests(path: str, trace, r) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("arrival,input_len,output_len,ttft,tpot\n")
        for row in zip(trace.arrival, trace.input_len, trace.output_len, r.ttft, r.tpot):
            f.write(f"{row[0]:.6f},{row[1]},{row[2]},{row[3]:.6f},{row[4]:.6f}\n")


def simulate_report(problem, args) -> tuple[dict, str]:
    dep = deployment_from_args(problem, args)
    _check(problem, dep)
    slo = problem.slo
    if not args.rate and not args.goodput and not args.replay:
        raise ValueError("give --rate R [R ...], --goodput and/or --replay BENCH_JSON")
    doc = {"model": problem.model.name, "hardware": problem.hw.name, "workload": args.workload,
           "deployment": args.plan or args.mode, "num_gpus": dep.num_gpus,
           "slo": {"ttft": slo.ttft, "tpot": slo.tpot, "attainment": slo.target}, "rates": []}
    lines = [f"Simulated {problem.model.name} on {dep.num_gpus} x {problem.hw.name} "
             f"({doc['deployment']}), {args.workload}, {problem.requests} requests x {len(problem.seeds)} seed(s)"]
    if problem.speed:
        doc["speed"] = problem.speed
        lines.append(f"  at the profile's times x {problem.speed['prefill']:.3g} (prefill), "
                     f"x {problem.speed['decode']:.3g} (decode)")
    if args.replay:
        _replay(args.replay, dep, slo, doc, lines)
    for rate in args.rate or []:
        if rate <= 0:
            raise ValueError(f"--rate must be > 0, got {rate}")
        atts, secs, res = [], [], None
        for seed in problem.seeds:
            trace = make_trace(problem.lengths, problem.requests, rate, seed, args.burstiness)
            t = time.perf_counter()
            r = simulate(trace, dep)
            secs.append(time.perf_counter() - t)
            atts.append(r.attainment(slo.ttft, slo.tpot))
            if res is None and args.per_request and not doc["rates"]:
                _write_requests(args.per_request, trace, r)
            res = res or r
        row = {"rate": rate, "attainment": float(np.mean(atts)), "attainment_std": float(np.std(atts)),
               "ttft": _pcts(res.ttft), "tpot": _pcts(res.tpot),
               "never_served": int(np.sum(~np.isfinite(res.ttft))), "sim_seconds": float(np.mean(secs))}
        doc["rates"].append(row)
        lines.append(f"  rate {rate:g} req/s: attainment {row['attainment']:.1%} (std {row['attainment_std']:.1%}); "
                     f"TTFT p50 {_ms(row['ttft']['p50'] or math.inf)} p90 {_ms(row['ttft']['p90'] or math.inf)}; "
                     f"TPOT p50 {_ms(row['tpot']['p50'] or math.inf)} p90 {_ms(row['tpot']['p90'] or math.inf)}; "
                     f"simulated in {row['sim_seconds'] * 1e3:.0f} ms")
    if args.goodput:
        g = goodput(dep, problem.lengths, slo, problem.requests, problem.seeds,
                    guess=capacity_guess(dep, problem.lengths), burstiness=args.burstiness)
        doc["goodput"] = {"rate": g.rate, "per_gpu": g.rate / dep.num_gpus, "seeds": g.seeds,
                          "std": g.spread, "probes": g.probes}
        lines.append(f"  goodput: {g.rate:.3g} req/s = {g.rate / dep.num_gpus:.3g} req/s per GPU "
                     f"(per seed: {', '.join(f'{x:.3g}' for x in g.seeds)})")
    return doc, "\n".join(lines)


def _replay(path: str, dep, slo, doc: dict, lines: list) -> None:
    """The bench runs in `path` against the simulation of their own arrivals and lengths."""
    import json

    from distserve.planner.reality_check import replay
    try:
        with open(path, encoding="utf-8") as f:
            bench = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--replay {path!r}: not a readable bench result ({e})") from None
    if not isinstance(bench, dict):
        raise ValueError(f"--replay {path!r}: not a bench result (a JSON object)")
    rows = replay(bench, dep, {"ttft": slo.ttft, "tpot": slo.tpot})
    doc["replay"] = {"file": path, "runs": rows}
    for r in rows:
        m, p = r["measured"], r["predicted"]
        lines.append(f"  replay of {path} at {r['rate']} req/s ({r['requests']} requests): attainment "
                     f"measured {m['attainment']:.1%}, predicted {p['attainment']:.1%} "
                     f"({r['error_pp']:+.1f} points); TTFT p90 {_ms(m['ttft_p90'] or math.inf)} vs "
                     f"{_ms(p['ttft_p90'] or math.inf)}; TPOT p90 {_ms(m['tpot_p90'] or math.inf)} vs "
                     f"{_ms(p['tpot_p90'] or math.inf)}")
