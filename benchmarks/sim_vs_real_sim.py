"""Steps 2 and 4 of the simulator-vs-reality check (benchmarks/sim_vs_real.py): the planner's
simulator for each deployment, the SLOs and rates it picks, and the deployment each saved run
is compared with. The comparison itself (the run simulated on exactly its arrivals and
lengths, stretched by the host model, at the calibration's speed and at its own) is
distserve.planner.reality_check's. It must never start a server: it reads the runs
benchmarks/sim_vs_real_real.py saved.
"""
from __future__ import annotations

import numpy as np
from sim_vs_real_config import BLOCK, KV_GIB, MAX_BATCHED_TOKENS, MAX_NUM_SEQS

from distserve.planner.latency import InstanceLatency
from distserve.planner.reality_check import fresh_attainment
from distserve.planner.simulator import Colocated, Disaggregated, InstanceConfig
from distserve.planner.workload import Lengths


def sim_deployment(name: str, entry, kv_tokens: int):
    inst = InstanceConfig(InstanceLatency(entry), kv_tokens, max_batch=MAX_NUM_SEQS,
                          max_num_batched_tokens=MAX_BATCHED_TOKENS)
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


def deployment_of(name: str, doc: dict):
    """Deployment `name` simulated from a (rescaled) profile, with the KV capacity its saved
    server reported (or what KV_GIB holds)."""
    kv = doc.get("_server", {}).get("kv_tokens_per_instance") or default_kv_tokens()
    return lambda entry: sim_deployment(name, entry, kv)
