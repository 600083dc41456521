"""Reproduce the DistServe paper's planner results with the A100 profiles of its artifact.

Prints, side by side with the paper: the placements of Table 3 (the artifact's interleaved
pipeline model, as the paper's engine runs PP; and, apart, the placements for our engine's
synchronous pipeline), the goodput ratio of the
disaggregated plan over the colocated baseline (the artifact's "vllm" profile), the artifact's
own check (OPT-13B on one node of 4 GPUs, SLO 200/100 ms: 1.56 req/s per GPU with prefill TP 2
and decode TP 1), and the search time for OPT-175B on 4 nodes of 8 GPUs. Saves everything to
benchmarks/results/paper.json.

    python benchmarks/paper.py [--requests 2000] [--seeds 3] [--jobs N] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from distserve.planner.goodput import SLO
from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.models import get_model
from distserve.planner.planning import make_plan
from distserve.planner.search import Candidate, Problem, confirm, confirm_colocated
from distserve.planner.simulator import Colocated, simulate
from distserve.planner.workload import Lengths, make_trace

# (case, model, workload, TTFT s, TPOT s, paper placement (prefill TP, PP, decode TP, PP),
#  paper ratio over vLLM, the paper's vLLM configuration (TP, PP))
CASES = [
    ("chatbot 13B", "facebook/opt-13b", "sharegpt", 0.25, 0.1, (2, 1, 1, 1), 4.6, (1, 1)),
    ("chatbot 66B", "facebook/opt-66b", "sharegpt", 2.5, 0.15, (4, 1, 2, 2), 2.75, (4, 1)),
    ("chatbot 66B (0.4/0.1)", "facebook/opt-66b", "sharegpt", 0.4, 0.1, (4, 1, 2, 2), 2.75, (4, 1)),
    ("code completion 66B", "facebook/opt-66b", "humaneval", 0.125, 0.2, (4, 1, 2, 2), 5.7, (4, 1)),
    ("summarization 66B", "facebook/opt-66b", "longbench", 15.0, 0.15, (4, 1, 2, 2), 4.3, (4, 1)),
    ("chatbot 175B", "facebook/opt-175b", "sharegpt", 4.0, 0.2, (3, 3, 4, 3), 2.0, (8, 1)),
]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "paper.json")


def problem(model, workload, ttft, tpot, nodes, gpn, args, **kw) -> Problem:
    kw.setdefault("pp_schedule", "interleaved")   # the artifact's engine, to reproduce the paper
    return Problem(get_model(model), Cluster(get_hardware("a100-80g"), nodes, gpn), Lengths(workload),
                   SLO(ttft, tpot), "distserve", "vllm", args.requests, tuple(range(args.seeds)),
                   jobs=args.jobs, **kw)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case, args) -> dict:
    name, model, workload, ttft, tpot, paper_place, paper_ratio, vllm = case
    log(f"== {name}: {model}, {workload}, SLO {ttft * 1e3:.0f} ms / {tpot * 1e3:.0f} ms")
    p = problem(model, workload, ttft, tpot, 4, 8, args)
    t = time.perf_counter()
    plan = make_plan(p, "low", workload, compare=not args.quick, progress=log)
    seconds = time.perf_counter() - t
    base = confirm_colocated(p, *vllm)
    base_per_gpu = base.rate / (vllm[0] * vllm[1])
    idle = idle_attainment(p, *vllm)
    ours = (plan.prefill.tp, plan.prefill.pp, plan.decode.tp, plan.decode.pp)
    best_colo = plan.colocated or {}
    log(f"   the same search for our engine's pipeline (synchronous PP, with bubbles)")
    engine = make_plan(problem(model, workload, ttft, tpot, 4, 8, args, pp_schedule="synchronous"),
                       "low", workload, compare=False, progress=log)
    return {
        "case": name, "model": model, "workload": workload, "ttft_slo": ttft, "tpot_slo": tpot,
        "placement": ours, "paper_placement": paper_place,
        "unit_gpus": ours[0] * ours[1] + ours[2] * ours[3],
        "goodput_per_gpu": plan.goodput_per_gpu, "goodput_spread": plan.goodput_spread,
        "vllm_config": vllm, "vllm_per_gpu": base_per_gpu, "vllm_spread": base.spread / (vllm[0] * vllm[1]),
        "ratio_vs_vllm": plan.goodput_per_gpu / base_per_gpu if base_per_gpu > 0 else None,
        "paper_ratio": paper_ratio, "vllm_idle_attainment": idle,
        "best_colocated": {k: best_colo.get(k) for k in ("tp", "pp", "goodput_per_gpu")},
        "ratio_vs_best_colocated": (plan.goodput_per_gpu / best_colo["goodput_per_gpu"]
                                    if best_colo.get("goodput_per_gpu") else None),
        "latency_source": plan.latency_source, "plan_seconds": seconds,
        "instances": [plan.prefill.instances, plan.decode.instances], "num_gpus": plan.num_gpus,
        "synchronous_pp": {
            "placement": (engine.prefill.tp, engine.prefill.pp, engine.decode.tp, engine.decode.pp),
            "instances": [engine.prefill.instances, engine.decode.instances],
            "goodput_per_gpu": engine.goodput_per_gpu},
    }


def artifact_check(args) -> dict:
    log("== artifact check: OPT-13B, 1 node x 4 GPUs, SLO 200/100 ms")
    p = problem("facebook/opt-13b", "sharegpt", 0.2, 0.1, 1, 4, args)
    plan = make_plan(p, "low", "sharegpt", compare=False, progress=log)
    unit = confirm(p, Candidate((2, 1), (1, 1)), p.hw.link_bandwidth)
    return {"placement": (plan.prefill.tp, plan.prefill.pp, plan.decode.tp, plan.decode.pp),
            "goodput_per_gpu": plan.goodput_per_gpu, "spread": plan.goodput_spread,
            "tp2_tp1_unit_per_gpu": unit.rate / 3, "tp2_tp1_unit_spread": unit.spread / 3,
            "paper": {"placement": (2, 1, 1, 1), "goodput_per_gpu": 1.56}}


def fig11a(args) -> dict:
    """SLO attainment of OPT-66B ShareGPT at 400/100 ms by per-GPU rate, against the artifact's
    simulator: DistServe-Low with the Table 3 placement (8 GPUs) and vLLM with TP 4."""
    import numpy as np
    from distserve.planner.simulator import Colocated
    from distserve.planner.goodput import attainment
    from distserve.planner.search import deployment
    path = "/work/shared/reference/a100-profiles/fig11a_ablation_attainment.json"
    ref = json.load(open(path)) if os.path.exists(path) else {}
    rates = [0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    p = problem("facebook/opt-66b", "sharegpt", 0.4, 0.1, 1, 8, args)
    dist = deployment(p, Candidate((4, 1), (2, 2)), p.hw.link_bandwidth)
    vllm = Colocated(p.instance(4, 1, "vllm"))
    def att(dep, gpus, n, seeds):
        return [100 * float(np.mean([attainment(dep, p.lengths, p.slo, r * gpus, n, s) for s in range(seeds)]))
                for r in rates]
    # the artifact's percentages are multiples of 1/150: 150-request traces (short: a burst more
    # than a steady load at the high rates), so both sizes are shown
    return {"per_gpu_rates": rates, "dist": att(dist, 8, args.requests, args.seeds),
            "vllm": att(vllm, 4, args.requests, args.seeds), "dist_150": att(dist, 8, 150, 10),
            "vllm_150": att(vllm, 4, 150, 10), "paper_dist": ref.get("dist"), "paper_vllm": ref.get("vllm")}


def search_time(args) -> dict:
    out = {}
    for algorithm in ("low", "high"):
        log(f"== search time: OPT-175B, 4 nodes x 8 GPUs, {algorithm} affinity, {args.jobs} process(es)")
        p = problem("facebook/opt-175b", "sharegpt", 4.0, 0.2, 4, 8, args)
        t = time.perf_counter()
        plan = make_plan(p, algorithm, "sharegpt", compare=False, progress=log)
        out[algorithm] = {"search_seconds": plan.search_seconds, "total_seconds": time.perf_counter() - t,
                          "placement": (plan.prefill.tp, plan.prefill.pp, plan.decode.tp, plan.decode.pp),
                          "goodput_per_gpu": plan.goodput_per_gpu}
    out["paper"] = "up to 1.3 minutes on 96 cores"
    out["cores"] = os.cpu_count()
    return out


def idle_attainment(p: Problem, tp: int, pp: int, rate: float = 0.02) -> float:
    """The baseline's SLO attainment at an almost idle rate. Near 0.9 the baseline's 90%
    goodput sits on a cliff (prompts whose prefill alone misses TTFT), and the ratio over it
    says little: 13B chatbot's vLLM TP 1 attains 0.889 at 0.02 req/s."""
    dep = Colocated(p.colocated_instance(tp, pp), 1, p.chunked)
    return float(np.mean([simulate(make_trace(p.lengths, p.requests, rate, seed), dep)
                          .attainment(p.slo.ttft, p.slo.tpot) for seed in p.seeds]))


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(doc: dict) -> str:
    lines = ["Table 3 placements and goodput vs vLLM (A100 profiles of the artifact; 4 nodes x 8 A100)",
             f"{'case':22s} {'ours P(tp,pp) D(tp,pp)':24s} {'paper':16s} {'ours/GPU':>9s} "
             f"{'vLLM/GPU':>9s} {'ratio':>6s} {'paper':>6s}  best colocated (ratio)"]
    for r in doc["cases"]:
        o, pp = r["placement"], r["paper_placement"]
        bc = r["best_colocated"]
        best = "-" if not bc.get("tp") else f"TP{bc['tp']} PP{bc['pp']} ({fmt(r['ratio_vs_best_colocated'])}x)"
        lines.append(f"{r['case']:22s} P({o[0]},{o[1]}) D({o[2]},{o[3]}){'':10s} "
                     f"P({pp[0]},{pp[1]}) D({pp[2]},{pp[3]})  {fmt(r['goodput_per_gpu'], '9.3f')} "
                     f"{fmt(r['vllm_per_gpu'], '9.3f')} {fmt(r['ratio_vs_vllm'], '5.2f')}x "
                     f"{r['paper_ratio']:5.2f}x  {best}"
                     + (f"  <- vLLM attains only {100 * r['vllm_idle_attainment']:.1f}% when idle: its 90% goodput "
                        "sits on a cliff, the ratio is ill-conditioned" if r.get("vllm_idle_attainment", 1) < 0.92 else ""))
    lines += ["", "The same search with our engine's pipeline (synchronous PP: micro-batches of one step "
              "through the stages, with bubbles)", f"{'case':22s} {'P(tp,pp) D(tp,pp)':24s} {'req/s/GPU':>9s}"]
    for r in doc["cases"]:
        e = r.get("synchronous_pp")
        if e:
            o = e["placement"]
            lines.append(f"{r['case']:22s} P({o[0]},{o[1]}) D({o[2]},{o[3]}){'':10s} "
                         f"{e['goodput_per_gpu']:9.3f}")
    a = doc["artifact_check"]
    lines += ["", f"Artifact check (OPT-13B, 1 x 4 GPUs, 200/100 ms): ours P({a['placement'][0]},{a['placement'][1]}) "
              f"D({a['placement'][2]},{a['placement'][3]}) {a['goodput_per_gpu']:.2f} req/s per GPU "
              f"(TP2+TP1 unit: {fmt(a['tp2_tp1_unit_per_gpu'])}); paper P(2,1) D(1,1) 1.56 req/s per GPU"]
    f = doc["fig11a"]
    lines += ["", "SLO attainment (%), OPT-66B ShareGPT 400/100 ms, by per-GPU rate (ours / artifact's simulator)",
              "  rate/GPU" + " " * 27 + " ".join(f"{r:>11g}" for r in f["per_gpu_rates"])]
    n = doc["settings"]["requests"]
    for key, label in (("dist", "DistServe P(4,1) D(2,2)"), ("vllm", "vLLM TP 4")):
        ref = f.get(f"paper_{key}") or [None] * len(f[key])
        for suffix, size in (("", n), ("_150", 150)):
            lines.append(f"  {label:24s} {size:5d} req: " + " ".join(
                f"{a:5.1f}/{fmt(b, '5.1f')}" for a, b in zip(f[key + suffix], ref)))
    s = doc["search_time"]
    for alg in ("low", "high"):
        lines.append(f"OPT-175B search on 4 x 8 GPUs ({alg} affinity): {s[alg]['search_seconds']:.1f} s search, "
                     f"{s[alg]['total_seconds']:.1f} s with the confirming simulation, on {s['cores']} cores; "
                     f"paper: {s['paper']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="skip the best-colocated search")
    ap.add_argument("--output", default=RESULTS)
    args = ap.parse_args()
    t = time.perf_counter()
    doc = {"settings": vars(args), "cases": [run_case(c, args) for c in CASES],
           "artifact_check": artifact_check(args), "fig11a": fig11a(args), "search_time": search_time(args)}
    doc["total_seconds"] = time.perf_counter() - t
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    print(report(doc))
    print(f"\nsaved {args.output} ({doc['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
