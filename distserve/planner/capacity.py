"""The most requests per second a deployment can process at all (no SLO: every stage busy):
the bound of the whole-deployment search and the ceiling of a goodput that no finite trace
breaks (with loose SLOs a short trace at any rate is one burst that still meets them).
Pure Python."""
from __future__ import annotations

import math

import numpy as np

from distserve.planner.simulator import InstanceConfig


def instance_capacity(inst: InstanceConfig, lengths, phase: str) -> float:
    """The most requests per second one instance can process (no SLO: every stage busy)."""
    ins, outs = lengths.sample(2000, np.random.default_rng(7))
    lat = inst.latency
    if phase == "prefill":
        mean_in = float(ins.mean())
        budget = min(inst.max_num_batched_tokens or inst.kv_capacity, inst.kv_capacity)
        most = max(1, int(budget // max(mean_in, 1)))
        a, _, c = lat.entry.prefill
        # k prompts per batch: k / (a + b k L + c k^2 L^2) peaks at k = sqrt(a / c) / L
        ks = {1, most}
        if a > 0 and c > 0:
            peak = math.sqrt(a / c) / max(mean_in, 1)
            ks |= {min(most, max(1, int(peak))), min(most, max(1, math.ceil(peak)))}
        best = 0.0
        for k in ks:
            t = lat.prefill_busy(k, k * mean_in, k * mean_in * mean_in)
            best = max(best, k / t if t > 0 else math.inf)
        return float(best)
    mean_out = float(outs.mean())
    context = float(ins.mean() + outs.mean() / 2)
    most = int(min(inst.max_batch, inst.kv_capacity // max(ins.mean() + outs.mean(), 1)))
    best = 0.0
    for b in sorted({1, max(1, most // 4), max(1, most // 2), max(1, most)}):
        per_lane = max(1, b // lat.lanes)   # interleaved PP: micro-batches in flight side by side
        step = lat.decode(np.full(per_lane, context))   # one lane's step, every stage
        best = max(best, per_lane * lat.lanes / step / mean_out if step > 0 else math.inf)
    return float(best)



def deployment_capacity(dep, lengths) -> float:
    """Disaggregated: its slower phase's; colocated: its instances', each doing both phases."""
    if hasattr(dep, "num_prefill"):
        return min(dep.num_prefill * instance_capacity(dep.prefill, lengths, "prefill"),
                   dep.num_decode * instance_capacity(dep.decode, lengths, "decode"))
    inst = dep.instance
    return dep.num_instances * min(instance_capacity(inst, lengths, "prefill"),
                                   instance_capacity(inst, lengths, "decode"))
