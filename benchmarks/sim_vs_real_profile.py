"""Step 1 of the simulator-vs-reality check (benchmarks/sim_vs_real.py): profile the model
with `distserve profile` on one pinned thread and cache the result, tagged with the engine code
it measured. It must never serve requests or simulate.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from interference import measure
from sim_vs_real_config import INTERFERENCE_ROUNDS, MAX_BATCHED_TOKENS, MODEL_KEY, PROFILE, ROOT, WORKLOADS
from sim_vs_real_real import machine_busy_seconds

from distserve.planner.profiles import Profile


def code_fingerprint() -> str:
    """Hash of the engine and model code, the C++ kernels included (committed or not): a
    cached profile is reused only when the code that produced it is the code being served."""
    h = hashlib.sha256()
    for sub in ("distserve/engine", "distserve/models", "distserve/kv", "distserve/planner/profile_engine.py",
                "distserve/planner/profile_cli.py"):
        files = [f for f in (ROOT / sub).rglob("*") if f.suffix in (".py", ".cpp", ".h")] \
            if (ROOT / sub).is_dir() else [ROOT / sub]
        for p in sorted(files):
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
           "--prefill-batches", "1,2,4", "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS),
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


def measure_interference(doc: dict, quick: bool) -> dict:
    """benchmarks/interference.py on this machine (the built-in model, one thread a core),
    measured once beside the profile and cached in its file while interference.py is unchanged."""
    code = hashlib.sha256((ROOT / "benchmarks/interference.py").read_bytes()).hexdigest()[:16]
    cached = doc.get("_interference")
    if not cached or doc.get("_interference_code") != code or (
            cached["rounds"] < INTERFERENCE_ROUNDS and not quick):
        rounds = 3 if quick else INTERFERENCE_ROUNDS
        print(f"measuring interference ({rounds} rounds): a neighbour instance on core 1, host work on core 0",
              flush=True)
        doc["_interference"] = measure(rounds=rounds, log=lambda line: print("  " + line, flush=True))
        doc["_interference_code"] = code
        PROFILE.write_text(json.dumps(doc, indent=2))
    return doc["_interference"]


def load_entry():
    doc = json.loads(PROFILE.read_text())
    return Profile.from_dict(doc).get(MODEL_KEY, 1), doc
