"""The placement search: the paper's Algorithm 1 (high node-affinity) and 2 (low).

Both start from the goodput of each phase alone for every allowed (TP, PP): a prefill-only
simulation (TTFT SLO only) and a decode-only one (TPOT SLO only). Algorithm 1 takes the best
per-GPU configuration of each phase and replicates n prefill and m decode instances so that
the slower side keeps up. Algorithm 2 pairs a prefill and a decode segment of the same
pipeline stage on one node (KV moves over NVLink), across `segments` nodes, and simulates each
pair jointly, best bound first: a pair's goodput cannot exceed its slower phase's, so the
search stops once no remaining bound beats the best pair found. Configurations are evaluated
in parallel processes. The chosen deployment is then simulated as a whole over several seeds.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from distserve.planner.calibration import scaled
from distserve.planner.goodput import DEFAULT_REQUESTS, SLO, goodput, goodput_one
from distserve.planner.hardware import Cluster
from distserve.planner.latency import InstanceLatency, instance_latency
from distserve.planner.memory import check_parallelism, kv_capacity_tokens
from distserve.planner.models import ModelSpec
from distserve.planner.profiles import ProfileEntry
from distserve.planner.simulator import Colocated, Disaggregated, InstanceConfig
from distserve.planner.workload import Lengths

_ZERO = InstanceConfig(InstanceLatency(ProfileEntry((0, 0, 0), (0, 0, 0), (0, 0, 0))), 10 ** 12)


@dataclass
class Problem:
    model: ModelSpec
    cluster: Cluster
    lengths: Lengths
    slo: SLO
    profile: str = "distserve"             # latency profile of the disaggregated instances
    colocated_profile: str | None = None   # of the colocated baseline (default: `profile`)
    requests: int = DEFAULT_REQUESTS       # per simulation
    seeds: tuple = (0, 1, 2)               # for the final plan's goodput and spread
    rate: float | None = None              # target rate (req/s); None: fill the cluster
    max_num_batched_tokens: int | None = None
    chunked: bool = False                  # colocated baseline with chunked prefill
    speed: dict | None = None              # {"prefill": k, "decode": k}: the profile's times x k
    pp_schedule: str = "synchronous"       # how PP instances run (latency.py): ours, or "interleaved"
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def hw(self):
        return self.cluster.hardware

    @property
    def min_kv_tokens(self) -> int:
        return min(self.lengths.max_total_len, self.model.max_positions)

    def instance(self, tp: int, pp: int, profile: str | None = None) -> InstanceConfig:
        lat = instance_latency(self.model, tp, pp, profile or self.profile, self.hw,
                               self.pp_schedule)
        if self.speed:
            lat = dataclasses.replace(lat, entry=scaled(lat.entry, self.speed["prefill"], self.speed["decode"]))
        return InstanceConfig(lat, kv_capacity_tokens(self.model, self.hw, tp, pp),
                              max_num_batched_tokens=self.max_num_batched_tokens)

    def colocated_instance(self, tp: int, pp: int) -> InstanceConfig:
        """An instance of the colocated baseline: its own profile (the artifact's "vllm" file)
        where one is given."""
        return self.instance(tp, pp, self.colocated_profile or self.profile)

    def parallelisms(self, max_gpus: int, max_tp: int) -> list[tuple[int, int]]:
        """(TP, PP) pairs that are allowed and fit in memory with a minimum KV pool."""
        return [(tp, pp) for tp in range(1, max_tp + 1) for pp in range(1, max_gpus // tp + 1)
                if check_parallelism(self.model, self.hw, tp, pp, self.min_kv_tokens) is None]


@dataclass
class Candidate:
    prefill: tuple[int, int]         # (TP, PP) of one prefill instance
    decode: tuple[int, int]
    segments: int = 1                # Algorithm 2: nodes one instance pair spans
    num_prefill: int = 1
    num_decode: int = 1
    bound: float = math.inf          # upper bound of goodput per GPU
    goodput: float | None = None     # simulated req/s of this pair / replica set

    @property
    def num_gpus(self) -> int:
        return (self.num_prefill * self.prefill[0] * self.prefill[1]
                + self.num_decode * self.decode[0] * self.decode[1])

    @property
    def per_gpu(self) -> float | None:
        return None if self.goodput is None else self.goodput / self.num_gpus

    def to_dict(self) -> dict:
        return {"prefill": {"tp": self.prefill[0], "pp": self.prefill[1], "instances": self.num_prefill},
                "decode": {"tp": self.decode[0], "pp": self.decode[1], "instances": self.num_decode},
                "segments": self.segments, "num_gpus": self.num_gpus,
                "goodput": self.goodput, "goodput_per_gpu": self.per_gpu,
                "bound_per_gpu": None if math.isinf(self.bound) else self.bound}


def deployment(p: Problem, c: Candidate, link: float) -> Disaggregated:
    return Disaggregated(p.instance(*c.prefill), p.instance(*c.decode), c.num_prefill,
                         c.num_decode, p.model.kv_bytes_per_token, link)


def _phase_goodput(task) -> float:
    """Goodput (req/s) of one instance running one phase alone."""
    p, phase, tp, pp = task
    inst = p.instance(tp, pp)
    if phase == "prefill":
        d = Disaggregated(inst, _ZERO)
        lengths, slo = _FirstTokenOnly(p.lengths), SLO(p.slo.ttft, math.inf, p.slo.target)
    else:
        d = Disaggregated(_ZERO, inst)
        lengths, slo = p.lengths, SLO(math.inf, p.slo.tpot, p.slo.target)
    return goodput_one(d, lengths, slo, p.requests)


def _pair_goodput(task) -> float:
    p, c, link = task
    return goodput_one(deployment(p, c, link), p.lengths, p.slo, p.requests, guess=max(c.bound * c.num_gpus, 0.01))


def _colocated_goodput(task) -> float:
    p, tp, pp = task
    return goodput_one(Colocated(p.colocated_instance(tp, pp), 1, p.chunked), p.lengths, p.slo, p.requests)


class _FirstTokenOnly(Lengths):
    """The workload's prompts, each asking for one token: a prefill-only simulation."""

    def __init__(self, inner: Lengths):
        self.inner = inner

    def sample(self, n, rng):
        ins, outs = self.inner.sample(n, rng)
        return ins, outs * 0 + 1

    @property
    def max_total_len(self) -> int:
        return self.inner.max_total_len


def run_parallel(fn, tasks: list, jobs: int) -> list:
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(fn, tasks))


def phase_goodputs(p: Problem, prefill: list, decode: list) -> tuple[dict, dict]:
    tasks = [(p, "prefill", tp, pp) for tp, pp in prefill] + [(p, "decode", tp, pp) for tp, pp in decode]
    rates = run_parallel(_phase_goodput, tasks, p.jobs)
    return dict(zip(prefill, rates[:len(prefill)])), dict(zip(decode, rates[len(prefill):]))


def search_high(p: Problem) -> tuple[Candidate | None, list[dict]]:
    """Algorithm 1: goodput per GPU of each phase alone, then n prefill and m decode instances
    so the slower side keeps up: the fewest GPUs reaching the target rate, or without one the
    best per-GPU goodput that fits the cluster (the per-phase best when it fits)."""
    c = p.cluster
    options = p.parallelisms(c.num_gpus, c.gpus_per_node)
    if not options:
        return None, []
    gp, gd = phase_goodputs(p, options, options)
    table = [{"phase": phase, "tp": k[0], "pp": k[1], "goodput": v, "goodput_per_gpu": v / (k[0] * k[1])}
             for phase, rates in (("prefill", gp), ("decode", gd)) for k, v in rates.items()]
    best = None
    for kp, rp in gp.items():
        for kd, rd in gd.items():
            if rp <= 0 or rd <= 0:
                continue
            if p.rate is not None:
                counts = [(max(1, math.ceil(p.rate / rp)), max(1, math.ceil(p.rate / rd)))]
            else:
                counts = [(n, m) for n in range(1, c.num_gpus + 1)
                          for m in {max(1, math.floor(n * rp / rd)), max(1, math.ceil(n * rp / rd))}]
            for n, m in counts:
                cand = Candidate(kp, kd, 1, n, m, goodput=min(n * rp, m * rd))
                if cand.num_gpus > c.num_gpus:
                    continue
                if best is None or _better(cand, best, p.rate is not None):
                    best = cand
    if best is None:
        kp = max(gp, key=lambda k: gp[k] / (k[0] * k[1]))
        kd = max(gd, key=lambda k: gd[k] / (k[0] * k[1]))
        best = Candidate(kp, kd, goodput=0.0)
    return best, table


def _better(a: Candidate, b: Candidate, fewest_gpus: bool = False) -> bool:
    """a beats b: fewer GPUs first when reaching a target; else per-GPU goodput, where a tie
    (within 3%) goes to the smaller unit."""
    if fewest_gpus and a.num_gpus != b.num_gpus:
        return a.num_gpus < b.num_gpus
    if a.per_gpu > b.per_gpu * 1.03:
        return True
    return a.per_gpu > b.per_gpu * 0.97 and a.num_gpus < b.num_gpus


def search_low(p: Problem) -> tuple[Candidate | None, list[dict]]:
    """Algorithm 2: prefill and decode segments of each stage share a node, searched jointly."""
    c = p.cluster
    layout = []
    for seg in range(1, c.nodes + 1):
        if p.model.layers % seg:
            continue
        inner = [(tp, pp) for tp in range(1, c.gpus_per_node + 1) for pp in range(1, c.gpus_per_node // tp + 1)]
        for pf in inner:
            for dc in inner:
                if pf[0] * pf[1] + dc[0] * dc[1] > c.gpus_per_node:
                    continue
                full_p, full_d = (pf[0], pf[1] * seg), (dc[0], dc[1] * seg)
                if all(check_parallelism(p.model, p.hw, *x, p.min_kv_tokens) is None for x in (full_p, full_d)):
                    layout.append(Candidate(full_p, full_d, seg))
    if not layout:
        return None, []
    gp, gd = phase_goodputs(p, sorted({x.prefill for x in layout}), sorted({x.decode for x in layout}))
    for cand in layout:
        cand.bound = min(gp[cand.prefill], gd[cand.decode]) / cand.num_gpus
    layout.sort(key=lambda x: -x.bound)
    best, i, chunk = None, 0, max(1, p.jobs)
    while i < len(layout) and layout[i].bound > 0 and (best is None or layout[i].bound > 0.97 * best.per_gpu):
        batch = [x for x in layout[i:i + chunk] if best is None or x.bound > 0.97 * best.per_gpu]
        i += chunk
        rates = run_parallel(_pair_goodput, [(p, x, p.hw.link_bandwidth) for x in batch], p.jobs)
        for cand, rate in zip(batch, rates):
            cand.goodput = rate
            if best is None or _better(cand, best):
                best = cand
    if best is None:   # no pair meets the SLOs at any rate
        best = Candidate(layout[0].prefill, layout[0].decode, layout[0].segments, goodput=0.0)
    return best, [x.to_dict() for x in layout]


def search_colocated(p: Problem) -> tuple[tuple[int, int] | None, float, list]:
    """Best per-GPU goodput of one colocated instance, over the allowed (TP, PP)."""
    c = p.cluster
    options = p.parallelisms(c.num_gpus, c.gpus_per_node)
    rates = run_parallel(_colocated_goodput, [(p, tp, pp) for tp, pp in options], p.jobs)
    table = [{"tp": tp, "pp": pp, "goodput": r, "goodput_per_gpu": r / (tp * pp)}
             for (tp, pp), r in zip(options, rates)]
    if not table:
        return None, 0.0, table
    best = max(table, key=lambda x: x["goodput_per_gpu"])
    return (best["tp"], best["pp"]), best["goodput_per_gpu"], table


def confirm(p: Problem, c: Candidate, link: float) -> object:
    """Goodput of the whole deployment over the problem's seeds."""
    guess = c.goodput if c.goodput and c.goodput > 0 else 1.0
    return goodput(deployment(p, c, link), p.lengths, p.slo, p.requests, p.seeds, guess=guess)


def confirm_colocated(p: Problem, tp: int, pp: int, instances: int = 1) -> object:
    return goodput(Colocated(p.colocated_instance(tp, pp), instances, p.chunked), p.lengths, p.slo,
                   p.requests, p.seeds)
