"""`distserve tune [MODEL] --ttft-slo S --tpot-slo S --workload W -o DIR`: the planner's plan
checked against the real deployment on this machine, refitted and re-planned (loop.py)."""
from __future__ import annotations

import argparse
import pathlib
import sys


def register(sub) -> None:
    p = sub.add_parser("tune", help="plan, serve the plan, measure it, refit and re-plan until "
                       "the plan stops changing; writes a report")
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: "
                   "built-in SmolLM2)")
    p.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    p.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    p.add_argument("--workload", default="sharegpt", choices=["sharegpt", "humaneval", "longbench"],
                   help="the bench dataset the plan is made and measured for")
    p.add_argument("-o", "--output", default="tune-report", help="report folder")
    p.add_argument("--latency-profile", default=None, help="a profile of this machine (default: "
                   "run `distserve profile` first)")
    p.add_argument("--cores", type=int, default=None, help="cores to plan for (default: this "
                   "process's)")
    p.add_argument("--speed", default=None, help="K or PREFILL:DECODE: the speed the first round "
                   "plans at, as factors on the profile's times (e.g. what an earlier tune's last "
                   "round measured, to go on from it; default: the profile's own)")
    p.add_argument("--rounds", type=int, default=2, help="plan-serve-measure rounds at most")
    p.add_argument("--num-rates", type=int, default=3, help="rates measured per round (1-5, "
                   "around the predicted goodput)")
    p.add_argument("--num-prompts", type=int, default=60, help="requests per measured rate, at "
                   "least (more where the run must span a few request lifetimes; 5x at most)")
    p.add_argument("--plan-requests", type=int, default=400, help="requests per simulation")
    p.add_argument("--repeats", type=int, default=1, help="runs of each rate's trace (2 or more: "
                   "the measured run-to-run spread widens the accuracy bound)")
    p.add_argument("--band-seeds", type=int, default=5, help="other samples of each run's trace "
                   "simulated for the predicted band's seed spread (0: none)")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from distserve.planner.calibration import parse_speed
    from distserve.slo import check_slo_seconds
    from distserve.tune.loop import RATE_FACTORS, TuneConfig, tune
    check_slo_seconds(args.ttft_slo, args.tpot_slo)
    speed = parse_speed(args.speed) if args.speed else None
    if args.rounds < 1 or not 1 <= args.num_rates <= len(RATE_FACTORS):
        raise ValueError(f"--rounds must be >= 1 and --num-rates in 1..{len(RATE_FACTORS)}")
    if args.num_prompts < 1 or args.plan_requests < 10 or args.repeats < 1 or args.band_seeds < 0:
        raise ValueError("--num-prompts and --repeats must be >= 1, --plan-requests >= 10 and "
                         "--band-seeds >= 0")
    cfg = TuneConfig(args.model, args.workload, args.ttft_slo, args.tpot_slo,
                     pathlib.Path(args.output), args.latency_profile, rounds=args.rounds,
                     num_rates=args.num_rates, num_prompts=args.num_prompts,
                     plan_requests=args.plan_requests, repeats=args.repeats,
                     band_seeds=args.band_seeds, speed=speed)
    if args.cores:
        cfg.cores = args.cores
    doc = tune(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"report: {cfg.out / 'report.md'} ({len(doc['rounds'])} round(s), {doc['stopped']})")
    return 130 if doc["stopped"] == "interrupted" else 0
