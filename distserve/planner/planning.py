"""From a problem (model, cluster, workload, SLOs) to a plan: search, replicate to the target
rate or the cluster, place on nodes, confirm by simulating the whole deployment over several
seeds, and compare with the best colocated deployment. Bad problems end in a ValueError whose
message says what to change, never in a traceback from deep inside the search.
"""
from __future__ import annotations

import math
import time

from distserve.planner.memory import check_parallelism
from distserve.planner.plan import PhasePlan, Plan, place, same_node, verdict_mode
from distserve.planner.search import (Candidate, Problem, confirm, confirm_colocated, deployment,
                                      search_colocated, search_high, search_low)
from distserve.planner.simulator import Colocated

ALGORITHMS = ("whole", "low", "high")


def _no_fit_message(p: Problem) -> str:
    why = check_parallelism(p.model, p.hw, 1, 1, p.min_kv_tokens)
    total = p.cluster.num_gpus
    return (f"{p.model.name} fits no (TP, PP) on {total} x {p.hw.name} "
            f"({p.cluster.nodes} node(s) of {p.cluster.gpus_per_node}): weights "
            f"{p.model.weight_bytes / 1e9:.0f} GB plus a KV pool of {p.min_kv_tokens} tokens "
            f"({why}); use more GPUs per node, more nodes, or a bigger accelerator")


def _no_goodput_message(p: Problem) -> str:
    fastest = p.instance(*max(p.parallelisms(p.cluster.num_gpus, p.cluster.gpus_per_node)))
    ins, _ = p.lengths.sample(2000, __import__("numpy").random.default_rng(0))
    t = fastest.latency.prefill([float(sorted(ins)[int(0.9 * len(ins))])])
    return (f"no deployment meets TTFT {p.slo.ttft * 1e3:.0f} ms and TPOT {p.slo.tpot * 1e3:.0f} ms "
            f"for {p.slo.target:.0%} of requests, even at a trickle of requests (alone, a P90 prompt "
            f"takes {t * 1e3:.0f} ms to prefill with TP {fastest.latency.tp}); loosen the SLOs")


def check_context(p: Problem) -> None:
    """A workload whose requests are longer than the model's context cannot be served."""
    longest = p.lengths.max_total_len
    if longest > p.model.max_positions:
        raise ValueError(f"the workload's longest request ({longest} tokens of prompt and output) "
                         f"is longer than {p.model.name}'s context ({p.model.max_positions} "
                         "positions); choose a model with a longer context, or a workload that "
                         "fits it")


def verdict(plan_per_gpu: float, colocated_per_gpu: float, colocated: dict) -> str:
    where = f"TP {colocated['tp']}, PP {colocated['pp']}"
    if colocated_per_gpu <= 0:
        return f"disaggregate: colocated ({where}) meets the SLOs at no rate"
    ratio = plan_per_gpu / colocated_per_gpu
    if ratio >= 1.05:
        return (f"disaggregate: {ratio:.2f}x the per-GPU goodput of the best colocated deployment "
                f"({where}, {colocated_per_gpu:.3g} req/s per GPU)")
    if ratio <= 0.95:
        return (f"stay colocated: {where} gives {1 / ratio:.2f}x the per-GPU goodput of "
                f"disaggregation ({colocated_per_gpu:.3g} vs {plan_per_gpu:.3g} req/s per GPU)")
    return f"either: disaggregation is within 5% of colocated ({where}), ratio {ratio:.2f}"


def _replicas(p: Problem, best: Candidate, algorithm: str) -> int:
    c = p.cluster
    if algorithm == "low":
        seg_gpus = best.num_gpus // best.segments
        slots = c.nodes * (c.gpus_per_node // seg_gpus) // best.segments
    else:
        slots = c.num_gpus // best.num_gpus
    if p.rate is None:
        return max(1, slots)
    k = math.ceil(p.rate / best.goodput) if algorithm == "low" else 1
    if k > max(slots, 1) or best.num_gpus * k > c.num_gpus:
        raise ValueError(f"reaching {p.rate} req/s needs {k * best.num_gpus} GPUs "
                         f"({best.goodput:.3g} req/s per {best.num_gpus}-GPU unit); the cluster has "
                         f"{c.num_gpus}")
    return k


def make_plan(p: Problem, algorithm: str = "whole", workload: str = "", compare: bool = True,
              progress=lambda msg: None) -> Plan:
    """algorithm: whole (every deployment of the cluster, simulated as a whole: whole.py),
    or the paper's low or high node-affinity algorithm (search.py)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose whole, low or high")
    check_context(p)
    if not p.parallelisms(p.cluster.num_gpus, p.cluster.gpus_per_node):
        raise ValueError(_no_fit_message(p))
    if algorithm == "whole":
        return _whole_plan(p, workload, compare, progress)
    start = time.perf_counter()
    progress(f"searching ({algorithm} node affinity, {p.jobs} process(es)) ...")
    best, table = (search_low if algorithm == "low" else search_high)(p)
    if best is None:
        raise ValueError(f"no prefill and decode segment pair of {p.model.name} fits one node of "
                         f"{p.cluster.gpus_per_node} x {p.hw.name}; try --algorithm high or bigger nodes")
    if not best.goodput:
        raise ValueError(_no_goodput_message(p))
    k = _replicas(p, best, algorithm)
    prefill = PhasePlan(best.prefill[0], best.prefill[1], best.num_prefill * k, p.max_num_batched_tokens)
    decode = PhasePlan(best.decode[0], best.decode[1], best.num_decode * k)
    c = p.cluster
    placement = place(c.nodes, c.gpus_per_node, prefill, decode, best.segments, algorithm == "low")
    link = c.hardware.link_bandwidth if algorithm == "low" or same_node(placement) else c.cross_node_bandwidth
    search_seconds = time.perf_counter() - start
    progress(f"search done in {search_seconds:.1f} s; simulating the plan over {len(p.seeds)} seed(s) ...")
    whole = Candidate(best.prefill, best.decode, best.segments, prefill.instances, decode.instances,
                      goodput=best.goodput * k)
    return _finish(p, algorithm, workload, compare, progress, whole, prefill, decode,
                   placement, link, table, search_seconds,
                   lambda: _colocated_alternative(p, search_colocated(p), 1))


def _colocated_alternative(p: Problem, found: tuple, instances: int | None):
    """The colocated deployment the plan is compared with, from a colocated search's (where,
    goodput, table): (TP, PP) and its replica count (`instances`; None: where[2]), simulated
    over the seeds; None when none meets the SLOs."""
    where, _, table = found
    if where is None:
        return None
    tp, pp = where[0], where[1]
    n = where[2] if instances is None else instances
    cg = confirm_colocated(p, tp, pp, n)
    gpus = tp * pp * n
    out = {"tp": tp, "pp": pp}
    if instances is None:
        out |= {"instances": n, "goodput": cg.rate}
    return out | {"goodput_per_gpu": cg.rate / gpus, "spread": cg.spread / gpus,
                  "chunked_prefill": p.chunked, "profile": p.colocated_profile or p.profile,
                  "candidates": table}


def _finish(p: Problem, algorithm: str, workload: str, compare: bool, progress, best: Candidate,
            prefill: PhasePlan, decode: PhasePlan, placement: list, link: float, table: list,
            search_seconds: float, colocated_search, simulations: int = 0) -> Plan:
    """Confirm the chosen deployment over the seeds, compare it with the colocated one (the
    verdict), and write it all down as a Plan."""
    g = confirm(p, best, link)
    gpus = prefill.num_gpus + decode.num_gpus
    colocated, text = None, ""
    if compare:
        progress("searching the colocated alternative ...")
        colocated = colocated_search()
        if colocated is not None:
            text = verdict(g.rate / gpus, colocated["goodput_per_gpu"], colocated)
    c = p.cluster
    lat_p, lat_d = p.instance(*best.prefill).latency, p.instance(*best.decode).latency
    return Plan(
        model=p.model.name, hardware=c.hardware.name, nodes=c.nodes, gpus_per_node=c.gpus_per_node,
        workload=workload, ttft_slo=p.slo.ttft, tpot_slo=p.slo.tpot, attainment_target=p.slo.target,
        algorithm=algorithm, prefill=prefill, decode=decode, goodput=g.rate,
        goodput_per_gpu=g.rate / gpus, goodput_spread=g.spread / gpus, placement=placement,
        colocated=colocated, verdict=text, candidates=table,
        latency_source={"prefill": lat_p.source, "decode": lat_d.source, "profile": p.profile},
        search_seconds=round(search_seconds, 3), simulations=simulations, mode=verdict_mode(text))


def _whole_plan(p: Problem, workload: str, compare: bool, progress) -> Plan:
    from distserve.planner.whole import search_whole, search_whole_colocated
    start = time.perf_counter()
    c = p.cluster
    progress(f"searching whole deployments of {c.num_gpus} GPUs ({p.jobs} process(es)) ...")
    best, table, sims = search_whole(p)
    if best is None or not best.goodput:
        raise ValueError(_no_goodput_message(p))
    prefill = PhasePlan(best.prefill[0], best.prefill[1], best.num_prefill, p.max_num_batched_tokens)
    decode = PhasePlan(best.decode[0], best.decode[1], best.num_decode)
    placement = place(c.nodes, c.gpus_per_node, prefill, decode)
    link = c.link(same_node(placement))
    search_seconds = time.perf_counter() - start
    progress(f"search done in {search_seconds:.1f} s ({sims} whole deployments simulated); "
             f"simulating the plan over {len(p.seeds)} seed(s) ...")
    return _finish(p, "whole", workload, compare, progress, best, prefill, decode, placement,
                   link, table, search_seconds,
                   lambda: _colocated_alternative(p, search_whole_colocated(p), None), sims)


def planned_deployment(p: Problem, plan: Plan):
    """The simulated deployment of a plan (what its predictions come from)."""
    if plan.mode == "colocated":
        c = plan.colocated
        return Colocated(p.colocated_instance(c["tp"], c["pp"]), c.get("instances") or 1)
    cand = Candidate((plan.prefill.tp, plan.prefill.pp), (plan.decode.tp, plan.decode.pp), 1,
                     plan.prefill.instances, plan.decode.instances)
    return deployment(p, cand, p.cluster.link(True))
