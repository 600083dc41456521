"""Pipeline parallelism as our engine runs it: the planner's PP model fitted on this machine,
then checked against a served PP instance.

    python benchmarks/pp_model.py [--quick] [--skip-steps]

1. Step times of SmolLM2 at TP 1 (one worker, one thread) and PP 2 (two workers, a core
   each) on the same shapes, timed by the package's profiler; the TP-1 entry and the PP-2
   pipeline cost (slowest stage, handovers: latency.py) fitted from them as `distserve
   profile --pp 2` does, with the fit's error; written as a profile
   (results/pp_model_profile.json).
2. One colocated PP-2 instance served for real (`distserve serve --mode colocated
   --pipeline-parallel-size 2`), loaded with `distserve bench` at a few rates; every run is
   replayed in the simulator (its exact arrivals and lengths) with both pipeline models: ours
   (synchronous: one step at a time, micro-batches through the stages) and the paper
   artifact's (interleaved: a batch in every stage).
Results: benchmarks/results/pp_model.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from serving import free_port, start_server, stop_server  # benchmarks/serving.py

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
MODEL = "HuggingFaceTB/SmolLM2-135M"
SERVE = ["--mode", "colocated", "--instances", "1", "--pipeline-parallel-size", "2",
         "--num-threads", "1", "--kv-cache-memory", "1"]


def step_times(quick: bool) -> dict:
    from distserve.planner.profile_engine import measure
    lens = [64, 256] if quick else [64, 256, 512, 1024]
    prefill = [[n] for n in lens] + [[n, n] for n in lens] + [[n] * 4 for n in lens[:2]]
    decode = [(b, c) for b in ((1, 2, 8, 16) if quick else (1, 2, 4, 8, 16, 32))
              for c in (128, 512)]
    out = {}
    for name, pp in (("tp1", 1), ("pp2", 2)):
        m = measure(None, "auto", "cpu", 1, prefill, decode, 3 if quick else 5, tp=1, pp=pp,
                    progress=lambda msg: print(f"  [{name}] {msg}", file=sys.stderr, flush=True))
        out[name] = {"prefill": m["prefill"], "decode": m["decode"]}
    return out


def fitted_profile(steps: dict) -> dict:
    """The profile `distserve profile --pp 1,2` would write from these times."""
    from distserve.planner.profile_cli import fit_entry, pipeline_errors, pipeline_fit
    base, pp2 = steps["tp1"], steps["pp2"]
    entry, errors = fit_entry(base["prefill"], base["decode"])
    fit = pipeline_fit(entry, base, pp2, 2)
    fit["error"] = pipeline_errors(entry, base, pp2, 2, fit)
    return {"_hardware": "cpu", "_device": "cpu", "_fit_error": {MODEL: errors},
            MODEL: {"1": entry.to_dict()}, "_pipeline": {MODEL: {"2": fit}}}


def bench(port: int, rates: list[float], slo: dict, n: int, out: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "distserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
           "--dataset", "humaneval", "--num-prompts", str(n), "--ignore-eos",
           "--request-rate", ",".join(f"{r:.4g}" for r in rates), "--ttft-slo", f"{slo['ttft']:g}",
           "--tpot-slo", f"{slo['tpot']:g}", "--save-result", str(out), "--disable-tqdm",
           "--seed", "1"]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def replays(doc: dict, profile: str, slo: dict) -> dict:
    """Each run against both pipeline models."""
    from distserve.planner.goodput import SLO
    from distserve.planner.hardware import Cluster, get_hardware
    from distserve.planner.models import get_model
    from distserve.planner.reality_check import replay
    from distserve.planner.search import Problem
    from distserve.planner.simulator import Colocated
    from distserve.planner.workload import Lengths
    out = {}
    for schedule in ("synchronous", "interleaved"):
        p = Problem(get_model(MODEL), Cluster(get_hardware("cpu"), 1, 2), Lengths("humaneval-trace"),
                    SLO(slo["ttft"], slo["tpot"]), profile, pp_schedule=schedule)
        out[schedule] = replay(doc, Colocated(p.instance(1, 2), 1), slo)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, rates and requests")
    ap.add_argument("--skip-steps", action="store_true", help="keep the saved step times")
    ap.add_argument("--rates", default="0.5,1,1.5,2,2.5", help="req/s of the served runs")
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "pp_model.json"
    report = json.loads(out.read_text()) if args.skip_steps else {}
    if not args.skip_steps:
        report["steps"] = step_times(args.quick)
    profile = fitted_profile(report["steps"])
    profile_path = RESULTS / "pp_model_profile.json"
    profile_path.write_text(json.dumps(profile, indent=2))
    fit = profile["_pipeline"][MODEL]["2"]
    report["pipeline_fit"] = fit
    for phase in ("prefill", "decode"):
        f, e = fit[phase], fit["error"][phase]
        print(f"PP 2 {phase}: slowest stage {f['bottleneck']:.2f} x even, handover "
              f"{f['hop_ms']:.2f} ms + {f['hop_ms_per_token']:.3f} ms per "
              f"{'token' if phase == 'prefill' else 'request'}; fit error mean {e['mean']:.1%}, "
              f"max {e['max']:.1%}")
    slo = {"ttft": args.ttft_slo, "tpot": args.tpot_slo}
    rates = [float(r) for r in args.rates.split(",")][: 3 if args.quick else None]
    tmp = pathlib.Path(tempfile.mkdtemp())
    port = free_port()
    proc = start_server(SERVE, port, tmp / "serve.log")
    try:
        doc = bench(port, rates, slo, 20 if args.quick else args.num_prompts, tmp / "bench.json")
    finally:
        stop_server(proc)
    (RESULTS / "pp_model_runs.json").write_text(json.dumps(doc))
    report["served"] = {"flags": SERVE, "slo": slo, "rates": rates,
                        "replay": replays(doc, str(profile_path), slo)}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nserved colocated PP 2, HumanEval, SLO {slo['ttft']:g} s / {slo['tpot']:g} s: "
          "attainment measured / predicted (synchronous, ours) / predicted (interleaved)")
    sync, inter = report["served"]["replay"]["synchronous"], report["served"]["replay"]["interleaved"]
    for a, b in zip(sync, inter):
        print(f"  {a['rate']:6.3g} req/s: {100 * a['measured']['attainment']:5.1f}% / "
              f"{100 * a['predicted']['attainment']:5.1f}% / {100 * b['predicted']['attainment']:5.1f}%"
              f"   mean TPOT {1e3 * a['measured']['tpot_mean']:.0f} / "
              f"{1e3 * a['predicted']['tpot_mean']:.0f} / {1e3 * b['predicted']['tpot_mean']:.0f} ms")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
