"""`distserve plan` and `distserve simulate` (and `profile`, whose engine side loads lazily).

`register(subparsers)` adds them to the `distserve` command; `main(argv)` runs them alone.
Bad values end in one line naming them (exit 2), never a traceback. The planner never
imports torch; only `profile` does, inside its handler.
"""
from __future__ import annotations

import argparse
import json
import sys

from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.profiles import BUILTIN_PROFILES


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, hardware and latency")
    g.add_argument("--model", help="catalogue name (e.g. facebook/opt-13b) or a config.json")
    g.add_argument("--hardware", default="a100-80g", help="a100-80g | h100-80g | h200 | l40s")
    g.add_argument("--latency-profile", default="distserve", help="profile JSON in the DistServe "
                   f"artifact's schema, or a built-in one: {', '.join(BUILTIN_PROFILES)} (A100 fits; "
                   "on Hopper the roofline takes its factors from the shipped measured table), "
                   "or a CSV of measured steps of your own cluster (docs/planner.md)")
    g.add_argument("--pp-schedule", choices=["synchronous", "interleaved"], default="synchronous",
                   help="how pipeline-parallel instances run: synchronous is distserve's engine "
                   "(one step at a time, micro-batches through the stages, with bubbles); "
                   "interleaved is the paper artifact's (a batch in every stage)")
    g = p.add_argument_group("workload and SLOs")
    g.add_argument("--workload", default="sharegpt", help="sharegpt | humaneval | longbench | "
                   "fixed:IN:OUT | a JSON/JSONL file of input_len/output_len")
    g.add_argument("--ttft-slo", type=float, default=None, help="seconds (required)")
    g.add_argument("--tpot-slo", type=float, default=None, help="seconds (required)")
    g.add_argument("--attainment", type=float, default=0.9, help="target share meeting both SLOs")
    g.add_argument("--num-requests", type=int, default=2000, help="requests per simulation")
    g.add_argument("--seeds", type=int, default=3, help="seeds for the goodput and its spread")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps, "
                   "as in `distserve bench` and vllm bench serve (1: Poisson, < 1: burstier)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per prefill batch, or per chunked-prefill iteration (default: the "
                   "instance's KV room; 512 with --chunked-prefill)")
    g.add_argument("--chunked-prefill", action="store_true", help="colocated: chunked prefill")
    g.add_argument("-j", "--jobs", type=int, default=None, help="search processes (default: all cores)")
    g.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    g = p.add_argument_group("calibration (this machine's speed against its profile)")
    g.add_argument("--speed", help="K or PREFILL:DECODE: the profile's step times x K, for a machine "
                   "that runs slower (K > 1) or faster than when it was profiled")
    g.add_argument("--step-traces", metavar="DIR", help="the step traces of a served run "
                   "(DISTSERVE_STEP_TRACE=DIR distserve serve ...): the profile's times x how much "
                   "slower its model steps really ran, per phase")
    g.add_argument("-o", "--output", help="write the result here (.yaml or .json)")


def register(sub) -> None:
    p = sub.add_parser("plan", help="search the deployment with the best per-GPU goodput")
    _common(p)
    g = p.add_argument_group("cluster and search")
    g.add_argument("--nodes", type=int, default=1, help="machines in the cluster")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (or cores, --hardware cpu) per machine")
    g.add_argument("--cross-node-bandwidth", type=float, default=25.0, help="Gbit/s between nodes")
    g.add_argument("--algorithm", choices=["whole", "low", "high"], default="whole",
                   help="whole: every deployment of the cluster, simulated as a whole (default); "
                   "or the paper's node-affinity algorithms: low (Algorithm 2, pairs share "
                   "nodes) or high (Algorithm 1)")
    g.add_argument("--rate", type=float, default=None, help="target req/s (default: fill the cluster)")
    g.add_argument("--colocated-profile", default=None, help="profile of the colocated baseline "
                   "(default: --latency-profile; the paper's vLLM fit is 'vllm')")
    g.add_argument("--no-compare", action="store_true", help="skip the colocated alternative")
    g.add_argument("--from-metrics", metavar="URL", help="re-plan from what a server started "
                   "with --plan observed (its recent lengths and arrival rate; its plan's model "
                   "and SLOs unless given here)")
    p.set_defaults(func=run_plan)

    s = sub.add_parser("simulate", help="simulate a deployment: SLO attainment and goodput")
    _common(s)
    g = s.add_argument_group("deployment (or --plan)")
    g.add_argument("--plan", help="a plan file from `distserve plan`")
    g.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated",
                   help="the deployment to simulate")
    for phase in ("prefill", "decode"):
        g.add_argument(f"--{phase}-tp", type=int, default=1, help=f"{phase}: tensor parallelism")
        g.add_argument(f"--{phase}-pp", type=int, default=1, help=f"{phase}: pipeline stages")
        g.add_argument(f"--{phase}-instances", type=int, default=1, help=f"{phase} instances")
    g.add_argument("--tp", type=int, default=1, help="colocated TP")
    g.add_argument("--pp", type=int, default=1, help="colocated PP")
    g.add_argument("--instances", type=int, default=1, help="colocated instances")
    g.add_argument("--link-bandwidth", type=float, default=None,
                   help="GB/s between prefill and decode instances (default: the in-node link)")
    g.add_argument("--rate", type=float, nargs="*", default=None, help="req/s to simulate")
    g.add_argument("--goodput", action="store_true", help="also bisect the goodput")
    g.add_argument("--per-request", help="CSV of every request (arrival, lengths, TTFT, TPOT) at "
                   "the first rate and seed")
    g.add_argument("--replay", metavar="BENCH_JSON", help="simulate exactly the arrivals and lengths "
                   "of a `distserve bench --save-result` file and set the measured SLO attainment "
                   "beside the predicted one, run by run")
    s.set_defaults(func=run_simulate)

    from distserve.planner.profile_cli import register as register_profile
    register_profile(sub)


def _problem(args, cluster: Cluster):
    from distserve.planner.goodput import SLO
    for flag in ("model", "ttft_slo", "tpot_slo"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag.replace('_', '-')} is required")
    from distserve.planner.models import get_model
    from distserve.planner.search import Problem
    from distserve.planner.workload import Lengths
    if args.num_requests < 10 or args.seeds < 1:
        raise ValueError("--num-requests must be >= 10 and --seeds >= 1")
    if args.burstiness <= 0 or not args.burstiness < float("inf"):
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    from distserve.slo import check_slo_seconds
    check_slo_seconds(args.ttft_slo, args.tpot_slo)
    kwargs = {"jobs": args.jobs} if getattr(args, "jobs", None) else {}
    cluster = measured_link(cluster, args.latency_profile)
    problem = Problem(get_model(args.model), cluster, Lengths(args.workload),
                      SLO(args.ttft_slo, args.tpot_slo, args.attainment), args.latency_profile,
                      getattr(args, "colocated_profile", None), args.num_requests,
                      tuple(range(args.seeds)), getattr(args, "rate", None) if args.func is run_plan else None,
                      args.max_num_batched_tokens, args.chunked_prefill,
                      pp_schedule=args.pp_schedule, **kwargs)
    problem.speed = _speed(args, problem)
    return problem


def measured_link(cluster: Cluster, profile_path: str) -> Cluster:
    """The cluster with the KV link the profile measured between instances on its host
    (`distserve profile` times a pull over the real backend), when it was made on this
    cluster's hardware; else as the hardware table says."""
    import dataclasses

    from distserve.planner.measured import is_table
    from distserve.planner.profiles import load_profile
    if is_table(profile_path):
        return cluster
    profile = load_profile(profile_path)
    rate = (profile.meta.get("_transfer") or {}).get("bytes_per_s")
    if not rate or profile.hardware != cluster.hardware.name:
        return cluster
    return dataclasses.replace(cluster, hardware=dataclasses.replace(cluster.hardware,
                                                                     link_bandwidth=float(rate)))


def _speed(args, problem) -> dict | None:
    """The factors on the profile's times that --speed or --step-traces ask for."""
    from distserve.planner.calibration import parse_speed, speed_of_traces
    if args.speed and args.step_traces:
        raise ValueError("give --speed or --step-traces, not both")
    if args.speed:
        return parse_speed(args.speed)
    if args.step_traces:
        return speed_of_traces(args.step_traces, problem.instance(1, 1).latency.entry)
    return None


def _emit(args, doc: dict, text: str) -> None:
    if args.output:
        import yaml
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) if args.output.endswith(".json")
                    else yaml.safe_dump(doc, sort_keys=False))
    print(json.dumps(doc, indent=2) if args.json else text)


def run_plan(args: argparse.Namespace) -> int:
    from distserve.planner.planning import make_plan
    from distserve.planner.report import format_plan
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    if args.rate is not None and args.rate <= 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    if args.from_metrics:
        from distserve.planner.observed import apply_observed, fetch_observed
        path = apply_observed(args, fetch_observed(args.from_metrics))
        print(f"planning from {args.from_metrics}: model {args.model}, rate {args.rate or 0:.3g} "
              f"req/s, SLOs {args.ttft_slo:g} / {args.tpot_slo:g} s, lengths in {path}",
              file=sys.stderr, flush=True)
    cluster = Cluster(get_hardware(args.hardware), args.nodes, args.gpus_per_node,
                      args.cross_node_bandwidth * 1e9 / 8)
    problem = _problem(args, cluster)
    # progress on stderr: stdout is the plan's alone, for a pipe or a file
    plan = make_plan(problem, args.algorithm, args.workload, not args.no_compare,
                     progress=lambda m: print(m, file=sys.stderr, flush=True))
    saved = bool(args.output)
    if args.output:
        plan.save(args.output)
        args = argparse.Namespace(**{**vars(args), "output": None})
    _emit(args, plan.to_dict(), format_plan(plan, saved=saved))
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from distserve.planner.report import simulate_report
    cluster = Cluster(get_hardware(args.hardware), 1, 8)
    problem = _problem(args, cluster)
    from distserve.planner.planning import check_context
    check_context(problem)
    doc, text = simulate_report(problem, args)
    _emit(args, doc, text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"distserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
