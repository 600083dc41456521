"""The whole-deployment search: every candidate is a complete deployment of the cluster, scored
by simulating it as a whole.

A disaggregated candidate is a prefill (TP, PP) and its instance count plus a decode (TP, PP)
and its count, using all of the cluster's GPUs or leaving some idle; a colocated one is a
(TP, PP) and its replica count behind one dispatcher. Scoring n instances as n times one
instance (the paper's algorithms) misses what pooling does: n instances behind one dispatcher
serve more than n times one's rate, so the count that balances the phases is found here by
simulation, not by arithmetic.

Two numbers per candidate keep the search short:
- an estimate, n x one instance's goodput (the paper's arithmetic), to try the likely best
  first;
- a bound, n x the most requests per second one instance can process at all (prefill:
  the best batch of mean-length prompts, all pipeline stages busy; decode: its largest batch
  at the mean context), which no simulation with SLOs can beat.
Candidates are tried best estimate first; one is ruled out with a single simulation at the
best goodput found so far (if it misses the attainment target there, it cannot win), and only
one that passes is bisected. The search ends when no bound left beats the best, or after
`max_simulations`. Without a target rate the best is the most goodput (ties within 1%: fewer
GPUs); with one, the fewest GPUs whose goodput reaches it (tried in that order, bounds
first).
"""
from __future__ import annotations

from dataclasses import dataclass

from distserve.planner.capacity import instance_capacity
from distserve.planner.goodput import attainment, goodput_one
from distserve.planner.plan import PhasePlan, place, same_node
from distserve.planner.search import (Candidate, Problem, deployment, phase_goodputs,
                                      run_parallel)
from distserve.planner.simulator import Colocated

MAX_SIMULATIONS = 400     # whole-deployment simulations one search may run
_TIE = 0.01


@dataclass
class Scored:
    """A candidate (disaggregated: a Candidate; colocated: ((TP, PP), replicas))."""
    what: object
    num_gpus: int
    estimate: float
    bound: float
    goodput: float | None = None


def _beats(p: Problem, dep, rate: float) -> bool:
    """Whether `dep` meets the attainment target at `rate` (one simulation, the first seed)."""
    return attainment(dep, p.lengths, p.slo, rate, p.requests, p.seeds[0]) >= p.slo.target


def _goodput(p: Problem, dep, guess: float) -> float:
    return goodput_one(dep, p.lengths, p.slo, p.requests, p.seeds[0], guess=max(guess, 1e-3))


def _search(p: Problem, scored: list[Scored], build, max_simulations: int) -> tuple[Scored | None, int]:
    """Best of `scored` by whole-deployment simulation (see the module's docstring)."""
    if not scored:
        return None, 0
    sims = 0
    if p.rate is not None:   # fewest GPUs reaching the rate; among equals, best estimate first
        for s in sorted(scored, key=lambda s: (s.num_gpus, -s.estimate)):
            if s.bound < p.rate or sims >= max_simulations or (dep := build(s)) is None:
                continue
            sims += 1
            s.goodput = _goodput(p, dep, p.rate)
            if s.goodput >= p.rate:
                return s, sims
        return None, sims
    best = None
    for s in sorted(scored, key=lambda s: (-s.estimate, s.num_gpus)):
        if (dep := build(s)) is not None:
            best = s
            best.goodput = _goodput(p, dep, best.estimate)
            sims += 1
            break
    if best is None:
        return None, sims
    for s in sorted(scored, key=lambda s: (-s.bound, s.num_gpus)):
        if s.bound <= best.goodput * (1 - _TIE) or sims >= max_simulations:
            break
        # to win: clearly more goodput, or as much (within the tie) on fewer GPUs
        need = best.goodput * (1 - _TIE if s.num_gpus < best.num_gpus else 1 + _TIE)
        if s is best or s.bound <= need or (dep := build(s)) is None:
            continue
        sims += 1
        if not _beats(p, dep, need):
            continue
        s.goodput = _goodput(p, dep, best.goodput)
        if s.goodput >= need:
            best = s
    return best, sims


def _phase(c: Candidate, role: str) -> PhasePlan:
    tp, pp = c.prefill if role == "prefill" else c.decode
    return PhasePlan(tp, pp, c.num_prefill if role == "prefill" else c.num_decode)


def search_whole(p: Problem, max_simulations: int = MAX_SIMULATIONS
                 ) -> tuple[Candidate | None, list[dict], int]:
    """The best disaggregated deployment of the cluster (a Candidate with its simulated
    goodput), the per-phase table, and how many whole deployments were simulated. The KV
    moves over the in-node link when the deployment's placement fits one node, else over the
    network."""
    c = p.cluster
    options = p.parallelisms(c.num_gpus, c.gpus_per_node)
    if not options:
        return None, [], 0
    gp, gd = phase_goodputs(p, options, options)
    cap_p = {k: instance_capacity(p.instance(*k), p.lengths, "prefill") for k in options}
    cap_d = {k: instance_capacity(p.instance(*k), p.lengths, "decode") for k in options}
    table = [{"phase": phase, "tp": k[0], "pp": k[1], "goodput": v,
              "goodput_per_gpu": v / (k[0] * k[1]), "capacity": cap[k]}
             for phase, rates, cap in (("prefill", gp, cap_p), ("decode", gd, cap_d))
             for k, v in rates.items()]
    scored = []
    for kp in options:
        for kd in options:
            if gp[kp] <= 0 or gd[kd] <= 0:
                continue
            gpus_p, gpus_d = kp[0] * kp[1], kd[0] * kd[1]
            for n in range(1, (c.num_gpus - gpus_d) // gpus_p + 1):
                for m in range(1, (c.num_gpus - n * gpus_p) // gpus_d + 1):
                    scored.append(Scored(Candidate(kp, kd, 1, n, m), n * gpus_p + m * gpus_d,
                                         min(n * gp[kp], m * gd[kd]),
                                         min(n * cap_p[kp], m * cap_d[kd])))
    def build(s: Scored):
        cand = s.what
        try:
            placement = place(c.nodes, c.gpus_per_node, _phase(cand, "prefill"),
                              _phase(cand, "decode"))
        except ValueError:   # its TP groups do not fit the nodes' free GPUs
            return None
        return deployment(p, cand, c.link(same_node(placement)))
    best, sims = _search(p, scored, build, max_simulations)
    if best is None:
        return None, table, sims
    best.what.goodput = best.goodput
    return best.what, table, sims


def _colocated_rate(task) -> float:
    p, tp, pp = task
    return goodput_one(Colocated(p.colocated_instance(tp, pp), 1, p.chunked), p.lengths, p.slo,
                       p.requests)


def search_whole_colocated(p: Problem, max_simulations: int = MAX_SIMULATIONS
                           ) -> tuple[tuple[int, int, int] | None, float, list[dict]]:
    """The best colocated deployment of the cluster: ((TP, PP, replicas), its goodput, the
    per-instance table)."""
    c = p.cluster
    options = p.parallelisms(c.num_gpus, c.gpus_per_node)
    rates = dict(zip(options, run_parallel(_colocated_rate, [(p, *k) for k in options], p.jobs)))
    table = [{"tp": k[0], "pp": k[1], "goodput": r, "goodput_per_gpu": r / (k[0] * k[1])}
             for k, r in rates.items()]
    scored = []
    for k, r in rates.items():
        if r <= 0:
            continue
        inst = p.colocated_instance(*k)
        # one instance does both phases: it cannot beat either phase's capacity alone
        cap = min(instance_capacity(inst, p.lengths, "prefill"),
                  instance_capacity(inst, p.lengths, "decode"))
        for n in range(1, c.num_gpus // (k[0] * k[1]) + 1):
            scored.append(Scored((k, n), n * k[0] * k[1], n * r, n * cap))

    def build(s: Scored):
        (tp, pp), n = s.what
        return Colocated(p.colocated_instance(tp, pp), n, p.chunked)
    best, _ = _search(p, scored, build, max_simulations)
    if best is None:
        return None, 0.0, table
    (tp, pp), n = best.what
    return (tp, pp, n), best.goodput, table
