"""Plan a deployment for this machine, serve it and measure it: profile -> plan -> serve -> bench.

    python examples/plan_serve_bench.py                       # the built-in SmolLM2, every core
    python examples/plan_serve_bench.py --model PATH --cores 2 --ttft-slo 2 --tpot-slo 0.2

Each step is a `distserve` command, printed before it runs, so it can be done by hand too.
Kept small: a short profile of this CPU (a few minutes for SmolLM2 on 2 cores), a plan over
its cores, then the plan served and sent --num-prompts HumanEval requests at half the planned
goodput and at the planned goodput. Everything is written under --out.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import yaml

DISTSERVE = [sys.executable, "-m", "distserve.cli"]
BUILT_IN = "HuggingFaceTB/SmolLM2-135M"   # the planner's name of the built-in model


def run(*args: str) -> None:
    print("$ distserve", " ".join(args), flush=True)
    subprocess.run([*DISTSERVE, *args], check=True)


def planner_name(model: str | None) -> str:
    """The name the planner gives the model, under which the profile must file its timings."""
    from distserve.planner.models import get_model   # no torch: the planner never imports it
    return get_model(model).name if model else BUILT_IN


def wait_for(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer in {timeout_s:g} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: built-in SmolLM2)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--ttft-slo", default="2", help="seconds (choose them for your machine: README)")
    p.add_argument("--tpot-slo", default="0.2", help="seconds")
    p.add_argument("--num-prompts", default="8", help="requests per measured rate")
    p.add_argument("--port", default="8000")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/distserve-example"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    slo = ["--ttft-slo", args.ttft_slo, "--tpot-slo", args.tpot_slo]

    # 1. this machine's step times: one thread per instance, few shapes
    profile = str(args.out / "profile.json")
    run("profile", *model, "-o", profile, "--name", planner_name(args.model), "--num-threads", "1",
        "--prefill-lens", "16,64,256", "--batch-sizes", "1,2,4,8", "--context-lens", "64,256",
        "--repeats", "2")
    # 2. the best deployment of this machine's cores (each core counts as one "GPU")
    plan_file = str(args.out / "plan.yaml")
    run("plan", "--model", args.model or BUILT_IN, "--hardware", "cpu", "--latency-profile", profile,
        "--nodes", "1", "--gpus-per-node", str(args.cores), "--workload", "humaneval", *slo,
        "--num-requests", "200", "--seeds", "2", "-o", plan_file)
    plan = yaml.safe_load(pathlib.Path(plan_file).read_text())
    planned = plan["colocated"]["goodput"] if plan["mode"] == "colocated" else plan["goodput"]
    # 3. serve the plan (what its verdict chose), 4. measure it at half and at its goodput
    url = f"http://127.0.0.1:{args.port}"
    print(f"$ distserve serve {' '.join(model)} --plan {plan_file} --port {args.port}", flush=True)
    server = subprocess.Popen([*DISTSERVE, "serve", *model, "--plan", plan_file,
                               "--port", args.port, "--kv-cache-memory", "0.25"])
    try:
        wait_for(url, server, timeout_s=600)
        result = str(args.out / "bench.json")
        run("bench", "--base-url", url, "--dataset", "humaneval", "--num-prompts", args.num_prompts,
            "--request-rate", f"{planned / 2:.3g},{planned:.3g}", *slo, "--save-result", result,
            "--disable-tqdm")
    finally:
        server.terminate()   # SIGTERM: the server drains, then stops every instance
        server.wait(60)
    measured = json.loads(pathlib.Path(result).read_text())
    print(f"\nplan: {plan['mode']}, predicted goodput {planned:.3g} req/s")
    for point in measured["points"]:
        print(f"  at {point['request_rate']} req/s: {100 * point['slo_attainment']:.1f}% of "
              f"{point['num_success'] + point['num_failed']} requests met both SLOs")
    bound = "at least " if measured["crossing"]["bound"] == "lower_bound" else ""   # all rates met it
    goodput = measured["goodput"]
    print(f"measured goodput: {bound}{goodput:.3g} req/s" if goodput is not None else
          "measured goodput: none of the rates met the attainment target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
