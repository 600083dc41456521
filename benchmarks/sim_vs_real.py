"""Simulator vs reality on this machine: the paper's Table 2 (SLO attainment, real vs
simulated, by rate) for our engine and our planner's simulator.

    python benchmarks/sim_vs_real.py            # full: 5 rates x 200 requests (~16 min on 2 cores)
    python benchmarks/sim_vs_real.py --quick    # smoke: 2 rates x 30 requests (~4 min)
    python benchmarks/sim_vs_real.py --reuse-profile        # skip profiling (same engine code)
    python benchmarks/sim_vs_real.py --reuse-real           # re-simulate the saved real runs only
    options: --workload humaneval|sharegpt, --rates 2,3,4, --num-prompts, --num-rates,
             --ttft-factor, --tpot-factor, --no-host-model, --deployments colocated,disagg

1. Profile: `distserve profile` of the built-in SmolLM2 pinned to core 0 with one thread (what
   every instance below runs with), timed in CPU seconds (`--clock cpu`: another job's time
   slices on the core are not counted), with mixed-context decode batches (our decode
   attention pads to the longest context: the profile finds the "max" form) and the engine's
   per-step overhead (scheduling, sampling, detokenisation) added to the fits. Cached in
   results/sim_vs_real_profile.json; --reuse-profile reuses it while the engine code hashes
   the same.
2. SLOs from the profile: TTFT = --ttft-factor (4) x the prefill of a mean prompt, TPOT =
   --tpot-factor (2) x a single request's decode step; rates from where the simulator puts
   both deployments at ~99% to where the better one falls to ~35% (or --rates).
3. Real: two deployments over the same 2 cores, served by `distserve serve` and measured by
   `distserve bench` (Poisson arrivals, --ignore-eos, seed + i at the i-th rate for both):
     colocated  `--mode colocated --instances 2 --num-threads 1`   (2 instances, a core each)
     disagg     `--prefill-instances 1 --decode-instances 1 --prefill-threads 1
                 --decode-threads 1`                               (1 prefill + 1 decode)
   with the CPU seconds of every process over each run: the server's HTTP + controller
   process, the bench client, each instance, and everything else on the machine (a run
   during which other jobs used more than 0.1 core is flagged: not a quiet machine).
4. Simulated: the planner's simulator on exactly the arrivals (send times) and lengths each
   real run sent, the instances' batching limits (256 requests, 2048 prefill tokens) and KV
   capacity (from the server's KV blocks). The server and the bench client share the
   instances' cores: their measured CPU stretches the instances' steps (host_slowdown;
   --no-host-model leaves it out; the diagnostics show both). Also the simulator on fresh
   traces of the same lengths over several seeds (the spread a different sample gives).
5. Table 2 for ours, per-rate latency diagnostics (real -> simulated), JSON in
   results/sim_vs_real.json (the real runs in results/sim_vs_real_<workload>_<deployment>.json)
   and a plot in results/sim_vs_real.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import serving  # benchmarks/serving.py

from distserve.planner.colocated import Colocated
from distserve.planner.latency import InstanceLatency, Profile, ProfileEntry
from distserve.planner.simulator import Disaggregated, InstanceConfig, simulate
from distserve.planner.workload import Lengths, Trace, make_trace

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
PROFILE = RESULTS / "sim_vs_real_profile.json"
MODEL_KEY = "SmolLM2-135M-Instruct"
BLOCK = 16
MAX_NUM_SEQS = 256
MAX_BATCHED_TOKENS = 2048
KV_GIB = 1.0
PROBE_REQUESTS = 8
RUN_OVERHEAD_S, PROBE_S, SERVER_START_S = 12, 30, 15   # for the time estimate
DEPLOYMENTS = {
    "colocated": ["--mode", "colocated", "--instances", "2", "--num-threads", "1"],
    "disagg": ["--prefill-instances", "1", "--decode-instances", "1",
               "--prefill-threads", "1", "--decode-threads", "1"],
}
# per workload: the profile's shapes cover its lengths; the planner's length data of the same
# dataset (SmolLM2 tokens) gives the mean prompt for the SLOs and the fresh traces
WORKLOADS = {
    "humaneval": {"lengths": "humaneval-trace", "prefill_lens": "16,32,64,128,256,384,512",
                  "contexts": "64,256,512", "max_total_len": None},
    "sharegpt": {"lengths": "sharegpt-trace", "prefill_lens": "16,64,128,256,512,1024,1536,2000",
                 "contexts": "128,512,1024,2000", "max_total_len": None},
}


# ----------------------------------------------------------------------------- profile
def code_fingerprint() -> str:
    """Hash of the engine and model code (committed or not): a cached profile is reused only
    when the code that produced it is the code being served."""
    h = hashlib.sha256()
    for sub in ("distserve/engine", "distserve/models", "distserve/kv", "distserve/planner/profile_engine.py",
                "distserve/planner/profile_cli.py"):
        for p in sorted((ROOT / sub).rglob("*.py")) if (ROOT / sub).is_dir() else [ROOT / sub]:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def pinned(core: int):
    return lambda: os.sched_setaffinity(0, {core}) if hasattr(os, "sched_setaffinity") else None


def run_profile(workload: str, quick: bool, clock: str = "cpu") -> None:
    w = WORKLOADS[workload]
    if PROFILE.exists():
        PROFILE.unlink()
    cmd = [sys.executable, "-m", "distserve.cli", "profile", "--device", "cpu", "--num-threads", "1",
           "-o", str(PROFILE), "--name", MODEL_KEY, "--prefill-lens", w["prefill_lens"],
           "--prefill-batches", "1,2,4", "--max-prefill-tokens", str(MAX_BATCHED_TOKENS),
           "--batch-sizes", "1,2,4,8,16,32" if quick else "1,2,4,8,16,32,64",
           "--context-lens", w["contexts"], "--max-decode-tokens", "40000",
           "--repeats", "3" if quick else "5", "--clock", clock]
    print("profiling (1 thread, core 0):", " ".join(cmd[3:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import resource
    r0, m0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy_seconds(), time.monotonic()
    subprocess.run(cmd, check=True, preexec_fn=pinned(0), env=env)
    r1, m1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy_seconds(), time.monotonic() - t0
    others = max(m1 - m0 - (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime), 0.0) / wall
    print(f"profiled in {wall:.0f} s; other processes used {others:.2f} cores meanwhile"
          + ("  << NOT A QUIET MACHINE: the profile is noisy" if others > 0.1 else ""), flush=True)
    doc = json.loads(PROFILE.read_text())
    doc["_others_cores"] = others
    doc["_code"] = code_fingerprint()
    doc["_workload"] = workload
    doc["_quick"] = quick
    PROFILE.write_text(json.dumps(doc, indent=2))


def load_entry():
    doc = json.loads(PROFILE.read_text())
    return Profile.from_dict(doc).get(MODEL_KEY, 1), doc


# ----------------------------------------------------------------------------- deployments
def sim_deployment(name: str, entry, kv_tokens: int):
    inst = InstanceConfig(InstanceLatency(entry), kv_tokens, max_batch=MAX_NUM_SEQS,
                          max_prefill_tokens=MAX_BATCHED_TOKENS)
    if name == "colocated":
        return Colocated(inst, num_instances=2)
    return Disaggregated(inst, inst, 1, 1)   # KV over shared memory: the copy is ~free


def default_kv_tokens() -> int:
    """Tokens of a KV_GIB cache of SmolLM2 (30 layers, 3 KV heads of 64) in bf16, as the
    server sizes it; replaced by what the server reports once it is up."""
    per_block = 2 * 30 * 3 * 64 * 2 * BLOCK
    return int(KV_GIB * 2 ** 30 // per_block) * BLOCK


def slos(entry, lengths: Lengths, ttft_factor: float, tpot_factor: float) -> dict:
    ins, outs = lengths.sample(4000, np.random.default_rng(0))
    mean_in, mean_out = float(ins.mean()), float(outs.mean())
    prefill_s = entry.prefill_ms([mean_in]) * 1e-3
    step_s = entry.decode_ms([mean_in + mean_out / 2]) * 1e-3
    return {"ttft": ttft_factor * prefill_s, "tpot": tpot_factor * step_s, "mean_prefill_s": prefill_s,
            "decode_step_s": step_s, "mean_input_len": mean_in, "mean_output_len": mean_out}


def fresh_attainment(dep, lengths: Lengths, rate: float, n: int, slo: dict, seeds) -> list[float]:
    return [simulate(make_trace(lengths, n, rate, seed), dep).attainment(slo["ttft"], slo["tpot"])
            for seed in seeds]


def pick_rates(deps: dict, lengths: Lengths, slo: dict, count: int, n: int) -> list[float]:
    """`count` evenly spaced rates from where the weaker deployment still simulates ~99%
    attainment to where the stronger one falls to ~35% (fresh traces, 3 seeds)."""
    grid = np.geomspace(0.05, 50, 120)
    curves = {k: [np.mean(fresh_attainment(d, lengths, r, n, slo, range(3))) for r in grid]
              for k, d in deps.items()}

    def first_below(curve, level):
        for r, a in zip(grid, curve):
            if a < level:
                return r
        return grid[-1]

    lo = min(first_below(c, 0.99) for c in curves.values())
    hi = max(first_below(c, 0.35) for c in curves.values())
    return [float(f"{r:.3g}") for r in np.linspace(lo, hi, count)]


# ----------------------------------------------------------------------------- real runs
def start_server(flags: list[str], port: int, log_path: pathlib.Path) -> tuple[subprocess.Popen, int]:
    """The server with this script's limits, and the KV blocks it reports."""
    proc = serving.start_server(["--dtype", "auto", "--kv-cache-memory", str(KV_GIB),
                                 "--max-num-seqs", str(MAX_NUM_SEQS),
                                 "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), *flags],
                                port, log_path)
    m = re.search(r"(\d+) KV blocks", log_path.read_text())
    return proc, int(m.group(1)) if m else 0


free_port, stop_server = serving.free_port, serving.stop_server


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> float:
    """CPU-seconds every process on the machine has used (from /proc/stat; steal included)."""
    try:
        fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def instance_pids(pid: int) -> dict[int, str]:
    """The server's instance processes: pid -> role (prefill, decode, colocated)."""
    out = {}
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            try:
                argv = pathlib.Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--role" in argv:
                out[child] = argv[argv.index(b"--role") + 1].decode()
    return out


def run_real(name: str, workload: str, rates: list[float], slo: dict, n: int, seed: int,
             out: pathlib.Path, tmp: pathlib.Path) -> dict:
    """One server; one `distserve bench` per rate (seed + i at the i-th rate, as a sweep
    would), with the CPU time of the server process (HTTP, controller), of the bench client
    and of each instance process over the run."""
    port = free_port()
    proc, blocks = start_server(DEPLOYMENTS[name], port, tmp / f"{name}.log")
    runs = []
    try:
        roles = instance_pids(proc.pid)
        instances = sorted(roles)
        # the probe: requests one at a time, to check the profile against the served path
        path = tmp / f"{name}-probe.json"
        subprocess.run([sys.executable, "-m", "distserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
                        "--dataset", workload, "--num-prompts", str(PROBE_REQUESTS), "--ignore-eos",
                        "--max-concurrency", "1", "--seed", "1000", "--save-result", str(path), "--disable-tqdm"],
                       capture_output=True, check=True)
        probe = json.loads(path.read_text())
        for i, rate in enumerate(rates):
            path = tmp / f"{name}-{i}.json"
            cmd = [sys.executable, "-m", "distserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
                   "--dataset", workload, "--num-prompts", str(n), "--ignore-eos", "--seed", str(seed + i),
                   "--request-rate", f"{rate:g}", "--num-gpus", "2",
                   "--ttft-slo", f"{slo['ttft']:.6g}", "--tpot-slo", f"{slo['tpot']:.6g}",
                   "--save-result", str(path), "--disable-tqdm"]
            if WORKLOADS[workload]["max_total_len"]:
                cmd += ["--max-total-len", str(WORKLOADS[workload]["max_total_len"])]
            cpu0 = {pid: cpu_seconds(pid) for pid in [proc.pid, *instances]}
            machine0 = machine_busy_seconds()
            t = time.monotonic()
            bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines, bench0 = [], None
            for line in bench.stdout:   # its CPU from here on is the load's, not its start-up's
                lines.append(line)
                if bench0 is None and "Sending a test request" in line:
                    bench0 = cpu_seconds(bench.pid)
            _, status, usage = os.wait4(bench.pid, 0)
            bench.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - t
            cpu1 = {pid: cpu_seconds(pid) for pid in cpu0}
            machine = machine_busy_seconds() - machine0
            if bench.returncode != 0 or not path.exists():
                print("".join(lines)[-4000:])
                raise RuntimeError(f"[{name}] bench at {rate:g} req/s failed (exit {bench.returncode})")
            run = json.loads(path.read_text())
            ours = sum(cpu1[p] - cpu0[p] for p in cpu0) + usage.ru_utime + usage.ru_stime
            run["_cpu"] = {"bench_s": usage.ru_utime + usage.ru_stime - (bench0 or 0.0),
                           "others_cores": max(machine - ours, 0.0) / wall,
                           "server_s": cpu1[proc.pid] - cpu0[proc.pid],
                           "instances_s": [cpu1[p] - cpu0[p] for p in instances],
                           "roles": [roles[p] for p in instances], "wall_s": wall}
            runs.append(run)
            c = run["_cpu"]
            print(f"[{name}] {rate:g} req/s: attainment {100 * run['slo_attainment']:.1f}%, {run['duration']:.0f} s; "
                  f"CPU s: server {c['server_s']:.1f}, bench {c['bench_s']:.1f}, instances "
                  f"{', '.join(f'{x:.1f}' for x in c['instances_s'])}; other processes: "
                  f"{c['others_cores']:.2f} cores" + ("  << NOT A QUIET MACHINE" if c["others_cores"] > 0.1 else ""),
                  flush=True)
    finally:
        stop_server(proc)
    doc = {"deployment": name, "serve_flags": DEPLOYMENTS[name], "runs": runs, "probe": probe,
           "_server": {"kv_blocks_total": blocks, "instances": 2,
                       "kv_tokens_per_instance": blocks // 2 * BLOCK if blocks else None}}
    out.write_text(json.dumps(doc))
    return doc


def runs_of(doc: dict) -> list[dict]:
    return doc.get("runs") or [doc]


# ----------------------------------------------------------------------------- comparison
def trace_of(run: dict) -> tuple[Trace, np.ndarray]:
    """The arrivals and lengths a real run sent (sorted by send time) and the order used."""
    reqs = run["requests"]
    send = np.array([r["send_time"] for r in reqs], float)
    order = np.argsort(send, kind="stable")
    ins = np.array([r["input_len"] for r in reqs], np.int64)
    outs = np.array([r["output_len"] if r["success"] else r["expected_output_len"] for r in reqs], np.int64)
    return Trace(send[order] - send[order][0], ins[order], outs[order]), order


def real_latencies(run: dict, order) -> tuple[np.ndarray, np.ndarray]:
    reqs = [run["requests"][i] for i in order]
    ttft = np.array([r["ttft"] if r["success"] else math.inf for r in reqs], float)
    tpot = np.array([r["tpot"] if r["success"] and r["tpot"] is not None else math.inf for r in reqs], float)
    return ttft, tpot


def stats(ttft: np.ndarray, tpot: np.ndarray, slo: dict) -> dict:
    ok_t, ok_p = ttft <= slo["ttft"], tpot <= slo["tpot"]
    ft, fp = ttft[np.isfinite(ttft)], tpot[np.isfinite(tpot)]
    return {"attainment": float(np.mean(ok_t & ok_p)), "ttft_attainment": float(np.mean(ok_t)),
            "tpot_attainment": float(np.mean(ok_p)),
            "ttft_mean": float(ft.mean()) if len(ft) else None,
            "ttft_p90": float(np.percentile(ft, 90)) if len(ft) else None,
            "tpot_mean": float(fp.mean()) if len(fp) else None,
            "tpot_p90": float(np.percentile(fp, 90)) if len(fp) else None}


def scaled(entry: ProfileEntry, k: float) -> ProfileEntry:
    return ProfileEntry(*(tuple(k * x for x in t) for t in (entry.prefill, entry.decode_small, entry.decode_large)),
                        entry.threshold, entry.decode_context)


def host_slowdown(run: dict, cores: int = 2) -> dict | None:
    """How much longer each instance's steps take because the host processes (the server's
    HTTP + controller process and the bench client, unpinned) run on the instances' cores.

    Measured over the run (CPU accounting, not latencies): H, the host's CPU-seconds per
    second, and u_i, each instance's. A host task that wakes (a token to stream) takes an
    idle core when there is one, and only when every core is busy does it preempt an
    instance: instance i loses H * prod_j u_j / cores of each second, against u_i of work, so
    its steps stretch by k_i = 1 + H * prod_{j != i} u_j / cores."""
    c, dur = run.get("_cpu"), run.get("duration")
    if not c or not dur or not c.get("instances_s"):
        return None
    h = (c["server_s"] + c["bench_s"]) / dur
    u = [min(max(x / dur, 0.0), 1.0) for x in c["instances_s"]]
    ks = [1 + h * float(np.prod([v for j, v in enumerate(u) if j != i])) / cores for i in range(len(u))]
    return {"host_cores": h, "utilisation": dict(zip(c["roles"], u)) if len(set(c["roles"])) == len(u) else u,
            "k": dict(zip(c["roles"], ks)) if len(set(c["roles"])) == len(u) else {"colocated": float(np.mean(ks))}}


def sim_deployment_k(name: str, entry: ProfileEntry, kv: int, k: dict | None):
    """The simulated deployment with each role's steps stretched by k[role]."""
    if not k:
        return sim_deployment(name, entry, kv)
    if name == "colocated":
        return sim_deployment(name, scaled(entry, k["colocated"]), kv)
    prefill, decode = (InstanceConfig(InstanceLatency(scaled(entry, k[role])), kv, max_batch=MAX_NUM_SEQS,
                                      max_prefill_tokens=MAX_BATCHED_TOKENS) for role in ("prefill", "decode"))
    return Disaggregated(prefill, decode, 1, 1)


def probe_check(doc: dict, entry: ProfileEntry) -> dict | None:
    """Requests served one at a time: real TTFT against the profile's prefill of the prompt,
    real TPOT against its decode step of one request. The median TTFT excess is the serving
    path's own latency (HTTP, tokenising, the control hops, streaming the token back), which
    occupies no instance: the simulated TTFTs get it added. The TPOT ratio checks the
    profile (a profile measured while other jobs ran is off here)."""
    probe = doc.get("probe")
    if not probe:
        return None
    ok = [r for r in probe["requests"] if r["success"]]
    extra = [r["ttft"] - entry.prefill_ms([r["input_len"]]) * 1e-3 for r in ok]
    ratio = [r["tpot"] / (entry.decode_ms([r["input_len"] + r["output_len"] / 2]) * 1e-3)
             for r in ok if r["output_len"] > 1]
    return {"ttft_extra_s": max(float(np.median(extra)), 0.0) if extra else 0.0,
            "ttft_extra_all_s": extra, "tpot_over_profile": float(np.median(ratio)) if ratio else None}


def compare(name: str, doc: dict, entry, slo: dict, lengths: Lengths, seeds: int,
            host_model: bool = True, serving_latency: bool = True) -> list[dict]:
    kv = doc.get("_server", {}).get("kv_tokens_per_instance") or default_kv_tokens()
    bare_dep = sim_deployment(name, entry, kv)
    probe = probe_check(doc, entry)
    d0 = probe["ttft_extra_s"] if probe and serving_latency else 0.0
    rows = []
    for run in runs_of(doc):
        trace, order = trace_of(run)
        host = host_slowdown(run) if host_model else None
        dep = sim_deployment_k(name, entry, kv, host["k"] if host else None)
        t0 = time.perf_counter()
        sim = simulate(trace, dep)
        sim.ttft = sim.ttft + d0
        sim_s = time.perf_counter() - t0
        bare = simulate(trace, bare_dep)
        bare.ttft = bare.ttft + d0
        real = stats(*real_latencies(run, order), slo)
        simd = stats(sim.ttft, sim.tpot, slo)
        fresh = fresh_attainment(dep, lengths, run["request_rate"], len(trace),
                                 {**slo, "ttft": slo["ttft"] - d0}, range(100, 100 + seeds))
        tokens = sum(r["output_len"] for r in run["requests"] if r["success"])
        cpu = run.get("_cpu") or {}
        rows.append({"rate": run["request_rate"], "n": len(trace), "failed": run.get("num_failed", 0),
                     "duration": run.get("duration"), "cpu": cpu, "host": host, "serving_latency_s": d0,
                     "host_ms_per_token": 1e3 * (cpu.get("server_s", 0) + cpu.get("bench_s", 0)) / tokens
                     if cpu and tokens else None,
                     "real": real, "sim": simd, "sim_without_host": stats(bare.ttft, bare.tpot, slo),
                     "sim_seconds": sim_s, "fresh_mean": float(np.mean(fresh)), "fresh_std": float(np.std(fresh)),
                     "diff_pp": 100 * abs(real["attainment"] - simd["attainment"])})
    return rows


def pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:6.1f}"


def ms(x) -> str:
    return "    -" if x is None or not math.isfinite(x) else f"{1e3 * x:5.0f}"


def print_tables(report: dict) -> None:
    deps = report["deployments"]
    names = list(deps)
    rates = sorted({r["rate"] for d in deps.values() for r in d["rows"]})
    print("\nTable 2 (ours): SLO attainment (%), real vs simulated on the same trace; "
          f"TTFT SLO {report['slo']['ttft'] * 1e3:.0f} ms, TPOT SLO {report['slo']['tpot'] * 1e3:.0f} ms")
    head = "rate (req/s) |" + "|".join(f" {n} real | {n} sim | diff pp " for n in names)
    print(head)
    print("-" * len(head))
    for rate in rates:
        cells = []
        for n in names:
            row = next((r for r in deps[n]["rows"] if r["rate"] == rate), None)
            if row is None:
                cells.append(" " * (len(n) * 2 + 22))
                continue
            cells.append(f" {pct(row['real']['attainment']):>{len(n) + 5}} | {pct(row['sim']['attainment']):>{len(n) + 4}}"
                         f" | {row['diff_pp']:7.1f} ")
        print(f"{rate:12g} |" + "|".join(cells))
    worst = max((r["diff_pp"] for d in deps.values() for r in d["rows"]), default=0.0)
    print(f"largest difference: {worst:.1f} pp (target: 3; the paper: 2)")
    print("\nProbe (requests one at a time): serving-path latency added to simulated TTFTs; "
          "real single-request TPOT / the profile's decode step (1.00: the profile holds)")
    for n in names:
        p = deps[n].get("probe")
        if p:
            flag = "" if p["tpot_over_profile"] is None or abs(p["tpot_over_profile"] - 1) < 0.05 else \
                "  << the profile does not hold for the served instances (noise? other jobs?)"
            print(f"  {n:<9} +{1e3 * p['ttft_extra_s']:.1f} ms TTFT; TPOT / profile {p['tpot_over_profile']:.3f}{flag}")
    print("\nDiagnostics (ms; attainment %): TTFT mean/p90 and TPOT mean/p90, real -> simulated; "
          "fresh = simulator on new traces of the same lengths (mean +- std over seeds)")
    for n in names:
        for r in deps[n]["rows"]:
            a, b = r["real"], r["sim"]
            print(f"  {n:<9} {r['rate']:6g} req/s n={r['n']:<4} TTFT {ms(a['ttft_mean'])}/{ms(a['ttft_p90'])} -> "
                  f"{ms(b['ttft_mean'])}/{ms(b['ttft_p90'])}  TPOT {ms(a['tpot_mean'])}/{ms(a['tpot_p90'])} -> "
                  f"{ms(b['tpot_mean'])}/{ms(b['tpot_p90'])}  TTFT-ok {pct(a['ttft_attainment'])}->"
                  f"{pct(b['ttft_attainment'])} TPOT-ok {pct(a['tpot_attainment'])}->{pct(b['tpot_attainment'])}"
                  f"  fresh {100 * r['fresh_mean']:.1f}+-{100 * r['fresh_std']:.1f}"
                  + (f"  failed {r['failed']}" if r["failed"] else "")
                  + (f"\n{'':12}host CPU {r['host']['host_cores']:.2f} cores ({r['host_ms_per_token']:.2f} ms/token), "
                     f"instances busy {_fmt(r['host']['utilisation'])}: steps x {_fmt(r['host']['k'], 3)}; "
                     f"simulated without the host: {pct(r['sim_without_host']['attainment']).strip()}%"
                     + (f"; other jobs used {r['cpu']['others_cores']:.2f} cores" if "others_cores" in r["cpu"] else "")
                     if r.get("host") else ""))


def _fmt(x, digits: int = 2) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {v:.{digits}f}" for k, v in x.items())
    return ", ".join(f"{v:.{digits}f}" for v in x)


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for (n, d), color in zip(report["deployments"].items(), ("tab:blue", "tab:orange")):
        rows = d["rows"]
        x = [r["rate"] for r in rows]
        ax.plot(x, [100 * r["real"]["attainment"] for r in rows], "o-", color=color, label=f"{n} real")
        ax.plot(x, [100 * r["sim"]["attainment"] for r in rows], "x--", color=color, label=f"{n} sim")
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("rate (req/s, 2 cores)")
    ax.set_ylabel("SLO attainment (%)")
    s = report["slo"]
    ax.set_title(f"{report['workload']}: TTFT {s['ttft'] * 1e3:.0f} ms, TPOT {s['tpot'] * 1e3:.0f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="humaneval")
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per rate (at most)")
    ap.add_argument("--budget-min", type=float, default=14.0, help="minutes the real runs may take: "
                    "fewer requests per rate when the rates are low")
    ap.add_argument("--num-rates", type=int, default=5)
    ap.add_argument("--rates", default=None, help="comma-separated req/s (default: chosen by the simulator)")
    ap.add_argument("--ttft-factor", type=float, default=4.0, help="TTFT SLO / mean prompt's prefill")
    ap.add_argument("--tpot-factor", type=float, default=2.0, help="TPOT SLO / single-request decode step")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-serving-latency", action="store_true", help="add no serving-path latency "
                    "(measured by the one-at-a-time probe) to the simulated TTFTs")
    ap.add_argument("--no-host-model", action="store_true", help="simulate the instances as if "
                    "the server and the bench client took none of their cores")
    ap.add_argument("--fresh-seeds", type=int, default=5, help="fresh simulated traces per rate")
    ap.add_argument("--reuse-profile", action="store_true", help="reuse the cached profile if the "
                    "engine code is unchanged")
    ap.add_argument("--reuse-real", action="store_true", help="re-simulate the saved real runs only")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 prompts, 2 rates")
    ap.add_argument("--out", default=str(RESULTS / "sim_vs_real.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.num_rates, args.fresh_seeds = 30, 2, 3
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    names = args.deployments.split(",")
    real_path = {n: RESULTS / f"sim_vs_real_{args.workload}_{n}.json" for n in names}

    fp = code_fingerprint()
    reuse = (args.reuse_profile or args.reuse_real) and PROFILE.exists()
    if reuse:
        cached = json.loads(PROFILE.read_text())
        if cached.get("_code") != fp or cached.get("_workload") != args.workload or (
                cached.get("_quick") and not args.quick):
            if args.reuse_real:   # the saved real runs were served by the cached profile's code
                print("note: the cached profile is of other engine code, another workload, or a "
                      "--quick run; kept, since --reuse-real re-simulates runs made with it")
            else:
                print("the cached profile is of other engine code, another workload, or a --quick "
                      "run: profiling again")
                reuse = False
    if not reuse:
        run_profile(args.workload, args.quick)
    entry, prof_doc = load_entry()
    lengths = Lengths(WORKLOADS[args.workload]["lengths"])
    slo = slos(entry, lengths, args.ttft_factor, args.tpot_factor)
    print(f"profile: prefill {entry.prefill}, decode {entry.decode_small} (ms); mean prompt "
          f"{slo['mean_input_len']:.0f} tokens prefills in {slo['mean_prefill_s'] * 1e3:.0f} ms, decode step "
          f"{slo['decode_step_s'] * 1e3:.1f} ms -> TTFT SLO {slo['ttft'] * 1e3:.0f} ms, TPOT SLO "
          f"{slo['tpot'] * 1e3:.1f} ms", flush=True)

    docs = {}
    if args.reuse_real:
        docs = {n: json.loads(real_path[n].read_text()) for n in names}
        rates = sorted({r["request_rate"] for d in docs.values() for r in runs_of(d)})
        first = runs_of(docs[names[0]])[0]
        slo.update({"ttft": first["ttft_slo"], "tpot": first["tpot_slo"]})
        args.num_prompts = len(first["requests"])
    else:
        if args.rates:
            rates = [float(x) for x in args.rates.split(",")]
        else:
            deps = {n: sim_deployment(n, entry, default_kv_tokens()) for n in names}
            rates = pick_rates(deps, lengths, slo, args.num_rates, max(args.num_prompts, 300))
        n_dep = len(names)
        fixed = n_dep * (len(rates) * RUN_OVERHEAD_S + PROBE_S + SERVER_START_S)
        fit = int((args.budget_min * 60 - fixed) / (n_dep * sum(1 / r for r in rates)))
        if fit < args.num_prompts:
            print(f"{args.num_prompts} requests per rate would take longer than --budget-min "
                  f"{args.budget_min:g}: {max(fit, 30)} each", flush=True)
            args.num_prompts = max(fit, 30)
        estimate = fixed + n_dep * sum(args.num_prompts / r for r in rates)
        print(f"rates {rates} req/s, {args.num_prompts} requests each: about {estimate / 60:.0f} min "
              "of real runs", flush=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="sim_vs_real-"))
        for n in names:
            docs[n] = run_real(n, args.workload, rates, slo, args.num_prompts, args.seed, real_path[n], tmp)

    report = {"workload": args.workload, "slo": slo, "rates": rates, "num_prompts": args.num_prompts,
              "profile": {"path": str(PROFILE.relative_to(ROOT)), "entry": entry.to_dict(),
                          "fit_error": prof_doc.get("_fit_error", {}).get(MODEL_KEY), "code": prof_doc.get("_code")},
              "deployments": {}}
    for n in names:
        report["deployments"][n] = {"serve_flags": DEPLOYMENTS[n], "server": docs[n].get("_server"),
                                    "probe": probe_check(docs[n], entry),
                                    "rows": compare(n, docs[n], entry, slo, lengths, args.fresh_seeds,
                                                    not args.no_host_model, not args.no_serving_latency)}
    report["max_diff_pp"] = max(r["diff_pp"] for d in report["deployments"].values() for r in d["rows"])
    report["seconds"] = time.monotonic() - t_start
    print_tables(report)
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(report, indent=2))
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:
        pass
    print(f"saved {out} ({report['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
