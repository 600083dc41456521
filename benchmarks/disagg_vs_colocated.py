"""Disaggregated vs colocated serving on this machine, measured with `distserve bench`.

    python benchmarks/disagg_vs_colocated.py [--workloads longbench,sharegpt] [--quick]
    python benchmarks/disagg_vs_colocated.py --from-saved   # the report again from the saved runs

Three deployments of the same model over the same 2 cores:
  disagg-1p1d     1 prefill + 1 decode instance, 1 thread each, pinned to a core each
  colocated-1x2   1 colocated instance with 2 threads (its own process, like the others: an
                  engine inside the HTTP server's process shares the GIL with it)
  colocated-2x1   2 colocated instances with 1 thread each
The TPOT SLO is derived from the decode step of a single request with a mean-length prompt,
measured here on 1 thread, and the TTFT SLO from the same request's prefill time. Each deployment is served
for real (`distserve serve`), swept over request rates with `distserve bench`, and its goodput
at 90% attainment is reported per instance core (2 cores for every deployment).
Results: benchmarks/results/disagg_vs_colocated.json and one attainment plot per workload; each
deployment's whole `distserve bench` result (every request) beside them in
benchmarks/results/disagg_vs_colocated_runs/, which `distserve simulate --replay` re-simulates.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from serving import free_port, start_server, stop_server  # benchmarks/serving.py

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
DEPLOYMENTS = {
    "disagg-1p1d": ["--prefill-instances", "1", "--decode-instances", "1",
                    "--prefill-threads", "1", "--decode-threads", "1"],
    "colocated-1x2": ["--mode", "colocated", "--instances", "1", "--num-threads", "2"],
    "colocated-2x1": ["--mode", "colocated", "--instances", "2", "--num-threads", "1"],
}
# mean prompt tokens of each workload with SmolLM2's tokenizer (from `distserve bench --dry-run`)
WORKLOADS = {"longbench": {"prompt_len": 1700}, "sharegpt": {"prompt_len": 700}}


def calibrate(prompt_len: int) -> dict:
    """Single-request decode step and prefill time on one thread, in a child process so the
    thread setting and memory do not leak into the servers."""
    code = f"""
import json, time, torch
torch.set_num_threads(1)
from distserve import LLM, SamplingParams
llm = LLM(None, num_threads=1, num_kv_blocks=512)
ids = (llm.tokenizer.encode("The city grew around its old market by the river. " * 200))[:{prompt_len}]
p = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True)
llm.generate([ids], p)  # warm-up
best_step, best_prefill = 1e9, 1e9
for _ in range(3):  # one request with a mean-length prompt: its decode steps and its prefill
    t = time.perf_counter()
    r = llm.generate([ids], p)[0].metrics
    best_step = min(best_step, (r["last_token_time"] - r["first_token_time"]) / 32)
    best_prefill = min(best_prefill, r["first_token_time"] - r["arrival_time"])
print(json.dumps({{"decode_step_s": best_step, "prefill_s": best_prefill, "prompt_len": len(ids)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(port: int, workload: str, rates: list[float], slo: dict, num_prompts: int,
              out: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "distserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
           "--dataset", workload, "--num-prompts", str(num_prompts), "--ignore-eos",
           "--request-rate", ",".join(f"{r:.4g}" for r in rates), "--num-gpus", "2",
           "--ttft-slo", f"{slo['ttft']:.4g}", "--tpot-slo", f"{slo['tpot']:.4g}",
           "--save-result", str(out), "--disable-tqdm", "--seed", "1"]
    subprocess.run(cmd, check=False)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="longbench,sharegpt")
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument("--num-prompts", type=int, default=40, help="requests per rate")
    ap.add_argument("--rate-fractions", default="0.3,0.6,0.9,1.2,1.6",
                    help="rates as fractions of one core's prefill capacity (1 / prefill time)")
    ap.add_argument("--tpot-factor", type=float, default=2.0, help="TPOT SLO / decode step")
    ap.add_argument("--ttft-factor", type=float, default=4.0, help="TTFT SLO / prefill time")
    ap.add_argument("--quick", action="store_true", help="10 prompts, 3 rates (a smoke run)")
    ap.add_argument("--from-saved", action="store_true", help="serve nothing: the goodputs, table "
                    "and plots again from the saved points, through the package's crossing")
    args = ap.parse_args(argv)
    if args.from_saved:
        return report_from_saved(RESULTS / "disagg_vs_colocated.json")
    if args.quick:
        args.num_prompts, args.rate_fractions = 10, "0.4,0.8,1.6"
    fractions = [float(f) for f in args.rate_fractions.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "disagg_vs_colocated.json"
    report = {"machine_cores": os.cpu_count(), "workloads": {}}
    if out.exists():  # a run of one workload keeps the other's recorded results
        report["workloads"] = json.loads(out.read_text()).get("workloads", {})
    tmp = pathlib.Path(tempfile.mkdtemp())
    for workload in args.workloads.split(","):
        cal = calibrate(WORKLOADS[workload]["prompt_len"])
        slo = {"tpot": args.tpot_factor * cal["decode_step_s"], "ttft": args.ttft_factor * cal["prefill_s"]}
        capacity = 1.0 / cal["prefill_s"]
        rates = [f * capacity for f in fractions]
        print(f"[{workload}] decode step {cal['decode_step_s'] * 1e3:.1f} ms, prefill of "
              f"{cal['prompt_len']} tokens {cal['prefill_s']:.2f} s -> TTFT SLO {slo['ttft']:.2f} s, "
              f"TPOT SLO {slo['tpot'] * 1e3:.1f} ms; rates {[round(r, 3) for r in rates]}", flush=True)
        entry = {"calibration": cal, "slo": slo, "tpot_factor": args.tpot_factor,
                 "ttft_factor": args.ttft_factor, "num_prompts": args.num_prompts, "rates": rates,
                 "deployments": {}}
        for name in args.deployments.split(","):
            port = free_port()
            proc = start_server(["--kv-cache-memory", "1", *DEPLOYMENTS[name]], port,
                                tmp / f"{workload}-{name}.log")
            runs = RESULTS / "disagg_vs_colocated_runs"
            runs.mkdir(exist_ok=True)
            try:
                result = run_bench(port, workload, rates, slo, args.num_prompts,
                                   runs / f"{workload}-{name}.json")
            finally:
                stop_server(proc)
            entry["deployments"][name] = summarize(result)
            print(f"[{workload}] {name}: goodput {entry['deployments'][name]['goodput_per_core']} req/s per core",
                  flush=True)
        best_colocated = max((d["goodput_per_core"] or 0.0) for n, d in entry["deployments"].items()
                             if n.startswith("colocated"))
        disagg = entry["deployments"].get("disagg-1p1d", {}).get("goodput_per_core") or 0.0
        entry["disagg_over_best_colocated"] = disagg / best_colocated if best_colocated else None
        report["workloads"][workload] = entry
        plot(workload, entry, RESULTS / f"disagg_vs_colocated_{workload}.png")
        out.write_text(json.dumps(report, indent=2))  # after each workload: a later one may fail
    print_table(report)
    print(f"saved {out}")
    return 0


def report_from_saved(path: pathlib.Path) -> int:
    """Each deployment's goodput per core recomputed from its saved (rate, attainment) points
    with the crossing `distserve bench` uses, set against the saved figure; table and plots."""
    from distserve.bench.metrics import highest_crossing
    report = json.loads(path.read_text())
    for workload, entry in report["workloads"].items():
        for name, d in entry["deployments"].items():
            pts = [p for p in d["points"] if isinstance(p["request_rate"], (int, float))]
            crossing = highest_crossing([p["request_rate"] for p in pts], [p["slo_attainment"] for p in pts], 0.9)
            again = None if crossing.value is None else crossing.value / 2
            same = again == d["goodput_per_core"] or (again is not None and d["goodput_per_core"] is not None
                                                       and abs(again - d["goodput_per_core"]) < 1e-9)
            print(f"{workload:<11} {name:<15} saved {d['goodput_per_core']}, recomputed {again}: "
                  f"{'same' if same else 'DIFFERENT'}")
        plot(workload, entry, RESULTS / f"disagg_vs_colocated_{workload}.png")
    print_table(report)
    return 0


def summarize(result: dict) -> dict:
    sweep = result.get("points") or []
    return {"goodput_per_core": result.get("per_gpu_goodput"),
            "goodput_bound": (result.get("crossing") or {}).get("bound"),
            "points": [{k: p.get(k) for k in ("request_rate", "slo_attainment", "ttft_attainment",
                                              "tpot_attainment", "request_throughput")} for p in sweep]}


def print_table(report: dict) -> None:
    print("\nworkload    deployment      goodput/core (req/s)   vs best colocated")
    for workload, entry in report["workloads"].items():
        for name, d in entry["deployments"].items():
            print(f"{workload:<11} {name:<15} {d['goodput_per_core'] or 0:>10.3f}")
        ratio = entry["disagg_over_best_colocated"]
        print(f"{workload:<11} disagg / best colocated: {ratio:.2f}x" if ratio else f"{workload:<11} (no colocated goodput)")


def plot(workload: str, entry: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in entry["deployments"].items():
        pts = [p for p in d["points"] if p["request_rate"] is not None]
        ax.plot([p["request_rate"] / 2 for p in pts], [100 * p["slo_attainment"] for p in pts],
                marker="o", label=name)
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("rate per core (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"{workload}: TTFT {entry['slo']['ttft']:.2f} s, TPOT {entry['slo']['tpot'] * 1e3:.0f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
