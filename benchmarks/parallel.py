"""Tensor and pipeline parallelism on this machine: step times, the speed-up K, and goodput.

    python benchmarks/parallel.py [--skip-goodput] [--quick]

1. Prefill latency and decode step time of SmolLM2 instances of TP 1, TP 2 and PP 2 (one
   thread per worker, so TP 1 runs on one core and the others on two), timed by the package's
   profiler (distserve.planner.profile_engine.measure) on the same shapes, with the paper's
   speed-up K (TP 1 ms / parallel ms) and the PP model's numbers (profile_cli.pipeline_fit;
   benchmarks/pp_model.py checks that model against a served PP instance).
2. Goodput of `distserve serve --prefill-tp 2` (prefill TP 2 -> decode TP 1, KV resharded on
   the way) against 1 prefill + 1 decode of one worker each, measured with `distserve bench`
   on the long-prompt workload, SLOs from the single-request times (TTFT 4x the prefill,
   TPOT --tpot-factor x the decode step). This machine has 2 cores: the TP 2 deployment runs 3
   workers on them (the decode worker shares a core with a prefill worker); goodput is per
   core of the machine (2) for both.
Results: benchmarks/results/parallel.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

from disagg_vs_colocated import WORKLOADS, calibrate, run_bench, summarize
from serving import free_port, start_server, stop_server

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
DEPLOYMENTS = {
    "1p1d": ["--prefill-instances", "1", "--decode-instances", "1", "--num-threads", "1"],
    "prefill-tp2-1p1d": ["--prefill-instances", "1", "--decode-instances", "1",
                         "--num-threads", "1", "--prefill-tp", "2", "--no-pin-cpus"],
}


def step_times(prefill_lens: list[int], batches: list[int], context: int, repeats: int) -> dict:
    from distserve.planner.profile_cli import fit_entry, pipeline_fit, speedup
    from distserve.planner.profile_engine import measure
    prefill = [[n] for n in prefill_lens]
    decode = [(b, context) for b in batches]
    out = {}
    for name, (tp, pp) in LAYOUTS.items():
        m = measure(None, "auto", "cpu", 1, prefill, decode, repeats,
                    progress=lambda msg: print(f"  [{name}] {msg}", file=sys.stderr, flush=True),
                    tp=tp, pp=pp)
        out[name] = {"prefill": m["prefill"], "decode": m["decode"]}
    base = out["tp1"]
    out["speedup"] = {name: {phase: speedup(base[phase], out[name][phase])
                             for phase in ("prefill", "decode")} for name in ("tp2", "pp2")}
    if len(base["prefill"]) >= 3 and len(base["decode"]) >= 3:
        entry, _ = fit_entry(base["prefill"], base["decode"])
        out["pp2_model"] = pipeline_fit(entry, base, out["pp2"], 2)
    return out


def print_steps(steps: dict) -> None:
    print("\nprefill of one prompt (ms)      TP 1     TP 2     PP 2")
    for i, (lens, _) in enumerate(steps["tp1"]["prefill"]):
        row = [steps[n]["prefill"][i][1] for n in LAYOUTS]
        print(f"  {lens[0]:>5} tokens            " + "".join(f"{v:>9.1f}" for v in row))
    print("decode step (ms)")
    for i, (ctxs, _) in enumerate(steps["tp1"]["decode"]):
        row = [steps[n]["decode"][i][1] for n in LAYOUTS]
        print(f"  batch {len(ctxs):>3}, context {ctxs[0]:<5}  " + "".join(f"{v:>9.1f}" for v in row))
    for name, k in steps["speedup"].items():
        print(f"K ({name} over tp1): prefill {k['prefill']:.2f}, decode {k['decode']:.2f}")
    fit = steps.get("pp2_model") or {}
    for phase, f in fit.items():
        if "bottleneck" in f:   # the synchronous pipeline's cost (benchmarks/pp_model.py)
            print(f"PP 2 {phase}: slowest stage {f['bottleneck']:.2f} x even, handover "
                  f"{f['hop_ms']:.2f} ms + {f['hop_ms_per_token']:.3f} ms per row")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-goodput", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="keep the saved step times")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, prompts and rates")
    ap.add_argument("--num-prompts", type=int, default=30)
    ap.add_argument("--rate-fractions", default="0.15,0.3,0.45,0.6,0.8",
                    help="rates as fractions of one core's prefill capacity")
    ap.add_argument("--tpot-factor", type=float, default=3.0, help="TPOT SLO / single-request "
                    "decode step (2 leaves no 1P1D goodput on this host: long contexts in a "
                    "batch take 2.5x the single step)")
    args = ap.parse_args(argv)
    quick = args.quick
    out = RESULTS / "parallel.json"
    report = {"machine_cores": os.cpu_count()}
    if args.skip_steps:
        report["steps"] = json.loads(out.read_text())["steps"]
    else:
        report["steps"] = step_times([128, 512] if quick else [128, 512, 1024, 2048],
                                     [1, 4] if quick else [1, 2, 4, 8, 16], 512, 1 if quick else 3)
    print_steps(report["steps"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.skip_goodput:
        print(f"saved {out}")
        return 0
    num_prompts = 10 if quick else args.num_prompts
    cal = calibrate(WORKLOADS["longbench"]["prompt_len"])
    slo = {"tpot": args.tpot_factor * cal["decode_step_s"], "ttft": 4.0 * cal["prefill_s"]}
    rates = [float(f) / cal["prefill_s"] for f in args.rate_fractions.split(",")]
    report["goodput"] = {"workload": "longbench", "calibration": cal, "slo": slo, "rates": rates,
                         "num_prompts": num_prompts, "deployments": {}}
    tmp = pathlib.Path(tempfile.mkdtemp())
    for name, flags in DEPLOYMENTS.items():
        port = free_port()
        proc = start_server(["--kv-cache-memory", "1", *flags], port, tmp / f"{name}.log")
        try:
            result = run_bench(port, "longbench", rates, slo, num_prompts, tmp / f"{name}.json")
        finally:
            stop_server(proc)
        report["goodput"]["deployments"][name] = summarize(result)
        print(f"{name}: goodput {report['goodput']['deployments'][name]['goodput_per_core']} "
              "req/s per core", flush=True)
        out.write_text(json.dumps(report, indent=2))
    d = report["goodput"]["deployments"]
    base, tp2 = d["1p1d"]["goodput_per_core"], d["prefill-tp2-1p1d"]["goodput_per_core"]
    report["goodput"]["tp2_over_1p1d"] = tp2 / base if base and tp2 is not None else None
    out.write_text(json.dumps(report, indent=2))
    print(f"prefill TP 2 / 1P1D goodput: {report['goodput']['tp2_over_1p1d']}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
