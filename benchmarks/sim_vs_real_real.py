"""Step 3 of the simulator-vs-reality check (benchmarks/sim_vs_real.py): serve each deployment
for real with `distserve serve`, load it with `distserve bench` at each rate, and account the
CPU seconds of every process over each run. It must never simulate: the comparison is
distserve.planner.reality_check's, driven by benchmarks/sim_vs_real_sim.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import serving  # benchmarks/serving.py
from sim_vs_real_config import (
    BLOCK,
    DEPLOYMENTS,
    KV_GIB,
    MAX_BATCHED_TOKENS,
    CALIBRATION_REQUESTS,
    MAX_NUM_SEQS,
    PROBE_REQUESTS,
    WORKLOADS,
)

from distserve.cluster.step_trace import ENV as STEP_TRACE
from distserve.planner.step_traces import read_traces, run_speed, speed_timeline, summarise


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


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the threads of a live process have spent runnable but waiting for a core: the
    time other processes preempted it (/proc/<pid>/task/*/schedstat, Linux)."""
    total = 0
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


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


def calibrate(base_cmd: list[str], path: pathlib.Path, seed: int, traces: pathlib.Path, entry) -> dict:
    """A short load at the run's rate just before the run (other prompts: another seed): how
    fast the served instances' model steps go against the profile right now, per phase. A
    prediction from the profile rescaled by it uses nothing measured during the run itself."""
    t = time.monotonic()
    subprocess.run([*base_cmd, "--num-prompts", str(CALIBRATION_REQUESTS), "--seed", str(seed),
                    "--save-result", str(path)], capture_output=True, check=True)
    wall = time.monotonic() - t
    summary = summarise(read_traces(traces, t, t + wall), entry, wall)
    return {"speed": run_speed(summary), "requests": CALIBRATION_REQUESTS, "wall_s": wall,
            "steps": {phase: sum(s[f"{phase}_steps"] for s in summary.values())
                      for phase in ("prefill", "decode")}}


def measure(cmd: list[str], path: pathlib.Path, name: str, rate: float, server_pid: int,
            roles: dict[int, str], traces: pathlib.Path, entry, label: str = "") -> dict:
    """One `distserve bench` run: its result, the instances' model steps over it against the
    profile (step traces), and the CPU seconds of the server, the bench client, each instance
    and every other process on the machine over it."""
    instances = sorted(roles)
    cpu0 = {pid: cpu_seconds(pid) for pid in [server_pid, *instances]}
    wait0 = {pid: runqueue_wait_seconds(pid) for pid in instances}
    machine0 = machine_busy_seconds()
    t = time.monotonic()
    bench = subprocess.Popen([*cmd, "--save-result", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, bench0 = [], None
    for line in bench.stdout:   # its CPU from here on is the load's, not its start-up's
        lines.append(line)
        if bench0 is None and "Sending a test request" in line:
            bench0 = cpu_seconds(bench.pid)
    _, status, usage = os.wait4(bench.pid, 0)
    bench.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t
    cpu1 = {pid: cpu_seconds(pid) for pid in cpu0}
    waits = [runqueue_wait_seconds(pid) - wait0[pid] for pid in instances]
    machine = machine_busy_seconds() - machine0
    if bench.returncode != 0 or not path.exists():
        print("".join(lines)[-4000:])
        raise RuntimeError(f"[{name}] bench at {rate:g} req/s failed (exit {bench.returncode})")
    run = json.loads(path.read_text())
    window = read_traces(traces, t, t + wall)
    run["_trace"] = summarise(window, entry, wall)
    run["_speed_timeline"] = speed_timeline(window, entry, run["num_requests"],
                                            run_speed(run["_trace"]))
    ours = sum(cpu1[p] - cpu0[p] for p in cpu0) + usage.ru_utime + usage.ru_stime
    run["_cpu"] = {"bench_s": usage.ru_utime + usage.ru_stime - (bench0 or 0.0),
                   "others_cores": max(machine - ours, 0.0) / wall,
                   "server_s": cpu1[server_pid] - cpu0[server_pid],
                   "instances_s": [cpu1[p] - cpu0[p] for p in instances],
                   "instances_wait_s": waits,
                   "roles": [roles[p] for p in instances], "wall_s": wall}
    c = run["_cpu"]
    print(f"[{name}] {rate:g} req/s{label and f' ({label})'}: attainment {100 * run['slo_attainment']:.1f}%, "
          f"{run['duration']:.0f} s; "
          f"CPU s: server {c['server_s']:.1f}, bench {c['bench_s']:.1f}, instances "
          f"{', '.join(f'{x:.1f}' for x in c['instances_s'])} (waiting for their core "
          f"{', '.join(f'{w:.1f}' for w in waits)}); other processes: "
          f"{c['others_cores']:.2f} cores" + ("  << NOT A QUIET MACHINE" if c["others_cores"] > 0.1 else ""),
          flush=True)
    return run


def run_real(name: str, workload: str, rates: list[float], slo: dict, n: int, seed: int,
             out: pathlib.Path, tmp: pathlib.Path, entry, repeats: int = 1) -> dict:
    """One server; one `distserve bench` per rate (seed + i at the i-th rate, as a sweep
    would; `repeats` > 1 runs it again with the same seed straight after: the same arrivals
    and prompts, to see how far the machine alone moves the attainment), each measured by
    measure()."""
    port = free_port()
    traces = tmp / f"traces-{name}"
    os.environ[STEP_TRACE] = str(traces)   # the instances log their steps (inherited)
    try:
        proc, blocks = start_server(DEPLOYMENTS[name], port, tmp / f"{name}.log")
    finally:
        del os.environ[STEP_TRACE]
    runs = []
    try:
        roles = instance_pids(proc.pid)
        # the probe: requests one at a time, to check the profile against the served path
        path = tmp / f"{name}-probe.json"
        bench_cmd = [sys.executable, "-m", "distserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
                     "--dataset", workload, "--ignore-eos", "--disable-tqdm"]
        subprocess.run([*bench_cmd, "--num-prompts", str(PROBE_REQUESTS), "--max-concurrency", "1", "--seed", "1000",
                        "--save-result", str(path)], capture_output=True, check=True)
        probe = json.loads(path.read_text())
        for i, rate in enumerate(rates):
            base = [*bench_cmd, "--request-rate", f"{rate:g}"]
            if WORKLOADS[workload]["max_total_len"]:
                base += ["--max-total-len", str(WORKLOADS[workload]["max_total_len"])]
            calibration = calibrate(base, tmp / f"{name}-{i}-calibration.json", seed + 5000 + i, traces, entry)
            cmd = [*base, "--num-prompts", str(n), "--seed", str(seed + i), "--num-gpus", "2",
                   "--ttft-slo", f"{slo['ttft']:.6g}", "--tpot-slo", f"{slo['tpot']:.6g}"]
            run = measure(cmd, tmp / f"{name}-{i}.json", name, rate, proc.pid, roles, traces, entry)
            run["_calibration"] = calibration
            runs.append(run)
            for k in range(1, repeats):   # the same arrivals and prompts again, straight after
                again = measure(cmd, tmp / f"{name}-{i}-repeat{k}.json", name, rate, proc.pid, roles,
                                traces, entry, label=f"repeat {k}")
                run.setdefault("_repeats", []).append(again)
    finally:
        stop_server(proc)
    doc = {"deployment": name, "serve_flags": DEPLOYMENTS[name], "runs": runs, "probe": probe,
           "_server": {"kv_blocks_total": blocks, "instances": 2,
                       "kv_tokens_per_instance": blocks // 2 * BLOCK if blocks else None}}
    out.write_text(json.dumps(doc))
    return doc
