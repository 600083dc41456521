"""Discrete-event simulator of a deployment over a request trace: per-request TTFT and TPOT.

Disaggregated: requests go to the prefill instance with the fewest queued or running prompts;
a prefill instance batches prompts FCFS up to a token budget and its KV room, through PP
pipeline stages; its KV stays until a decode instance pulls it. When the first token is out the
request goes to the least-loaded decode instance, which admits FCFS while its KV pool holds the
whole request (prompt + output: no preemption), then pulls the KV (bytes / link bandwidth),
frees the prefill side, and batches it continuously into one of its PP lanes. The colocated
baseline lives in distserve.planner.colocated. Times are seconds; TTFT and TPOT follow the
reference definitions; a request that fits no instance gets infinite TTFT and TPOT.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from distserve.planner.lane import Lane
from distserve.planner.latency import PP_STAGE_MS, InstanceLatency
from distserve.planner.workload import Trace

INF = math.inf
PF_FREE, PF_DONE, XFER, LANE = 0, 1, 2, 3


@dataclass(frozen=True)
class InstanceConfig:
    latency: InstanceLatency
    kv_capacity: int                       # KV tokens the instance holds
    max_batch: int = 10 ** 7               # requests decoding at once
    max_prefill_tokens: int | None = None  # prompt tokens per prefill batch (None: the KV room,
                                           # as the artifact); a longer prompt runs alone

    @property
    def pp(self) -> int:
        return self.latency.pp


@dataclass(frozen=True)
class Disaggregated:
    prefill: InstanceConfig
    decode: InstanceConfig
    num_prefill: int = 1
    num_decode: int = 1
    kv_bytes_per_token: float = 0.0
    link_bandwidth: float = INF            # bytes/s between a prefill and a decode instance

    @property
    def num_gpus(self) -> int:
        p, d = self.prefill.latency, self.decode.latency
        return self.num_prefill * p.tp * p.pp + self.num_decode * d.tp * d.pp


@dataclass
class SimResult:
    ttft: np.ndarray
    tpot: np.ndarray

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        """Share of requests meeting both SLOs."""
        return float(np.mean((self.ttft <= ttft_slo) & (self.tpot <= tpot_slo))) if len(self.ttft) else 1.0


def result(arrival: list, first: list, last: list, out: list) -> SimResult:
    first_a, last_a, out_a = np.array(first), np.array(last), np.array(out, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out_a > 1, (last_a - first_a) / np.maximum(out_a - 1, 1), 0.0)
    tpot[~np.isfinite(first_a)] = INF
    return SimResult(first_a - np.array(arrival), tpot)


def decode_coeffs(latency: InstanceLatency):
    """B -> (a, b, c) in seconds, picking the small- or large-batch fit."""
    e = latency.entry
    small, large = tuple(x * 1e-3 for x in e.decode_small), tuple(x * 1e-3 for x in e.decode_large)
    th = e.threshold
    return lambda b: small if b < th else large


def simulate(trace: Trace, deployment) -> SimResult:
    """Per-request TTFT and TPOT of `trace` served by a Disaggregated or Colocated deployment."""
    if not isinstance(deployment, Disaggregated):
        from distserve.planner.colocated import simulate_colocated
        return simulate_colocated(trace, deployment)
    return _Disaggregated(trace, deployment).run()


class _Disaggregated:
    def __init__(self, trace: Trace, d: Disaggregated) -> None:
        self.arr, self.inp, self.out = trace.arrival.tolist(), trace.input_len.tolist(), trace.output_len.tolist()
        n = len(self.arr)
        self.first, self.last, self.off, self.src = [INF] * n, [INF] * n, [0] * n, [0] * n
        self.heap: list = []
        self.seq = 0
        P, D = d.prefill, d.decode
        self.pcap, self.dcap, self.dmax = P.kv_capacity, D.kv_capacity, D.max_batch
        self.budget = P.max_prefill_tokens or P.kv_capacity
        self.pp = P.pp
        a, b, c = P.latency.entry.prefill
        pc = PP_STAGE_MS * self.pp if self.pp > 1 else 0.0
        self.pstage = (a * 1e-3 / self.pp + pc * 1e-3, b * 1e-3 / self.pp, c * 1e-3 / self.pp)
        self.xfer = d.kv_bytes_per_token / d.link_bandwidth if d.link_bandwidth < INF else 0.0
        self.coeffs = decode_coeffs(D.latency)
        self.pq = [deque() for _ in range(d.num_prefill)]
        self.pkv, self.pload = [0] * d.num_prefill, [0] * d.num_prefill
        self.pbusy = [False] * d.num_prefill
        self.stage_free = [[0.0] * self.pp for _ in range(d.num_prefill)]
        self.dwait = [deque() for _ in range(d.num_decode)]
        self.dkv, self.dactive, self.dload = [0] * d.num_decode, [0] * d.num_decode, [0] * d.num_decode
        padded = D.latency.entry.decode_context == "max"
        self.lanes = [[Lane(padded) for _ in range(D.pp)] for _ in range(d.num_decode)]

    def push(self, t: float, kind: int, x, y) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, x, y))

    def run(self) -> SimResult:
        arr, inp, out, heap = self.arr, self.inp, self.out, self.heap
        n, ai, npf = len(arr), 0, len(self.pq)
        while True:
            if heap and (ai >= n or heap[0][0] <= arr[ai]):
                t, _, kind, x, y = heapq.heappop(heap)
                if kind == LANE:
                    lane = self.lanes[x][y[0]]
                    if lane.version == y[1]:
                        self.boundary(x, lane, t)
                elif kind == XFER:
                    self.transferred(x, y, t)
                elif kind == PF_DONE:
                    self.prefilled(x, y, t)
                else:
                    self.pbusy[x] = False
                    self.start_prefill(x, t)
            elif ai < n:
                r, t = ai, arr[ai]
                ai += 1
                if inp[r] > self.pcap or inp[r] + out[r] > self.dcap:
                    continue   # fits no instance: never served
                j = 0 if npf == 1 else min(range(npf), key=lambda i: self.pload[i])
                self.src[r] = j
                self.pq[j].append(r)
                self.pload[j] += 1
                self.start_prefill(j, t)
            else:
                break
        return result(arr, self.first, self.last, out)

    def start_prefill(self, j: int, now: float) -> None:
        q = self.pq[j]
        if self.pbusy[j] or not q:
            return
        inp, budget, room = self.inp, self.budget, self.pcap - self.pkv[j]
        batch, tot, sq = [], 0, 0
        while q:
            length = inp[q[0]]
            if (batch and tot + length > budget) or tot + length > room:
                break
            batch.append(q.popleft())
            tot += length
            sq += length * length
        if not batch:
            return   # KV full: retried when a decode instance pulls some away
        self.pkv[j] += tot
        a, b, c = self.pstage
        st = a + b * tot + c * sq
        self.pbusy[j] = True
        if self.pp == 1:
            self.push(now + st, PF_DONE, j, batch)
            return
        free, t = self.stage_free[j], now
        for s in range(self.pp):
            t = max(t, free[s]) + st
            free[s] = t
        self.push(t, PF_DONE, j, batch)
        self.push(now + st, PF_FREE, j, None)

    def prefilled(self, j: int, batch: list, now: float) -> None:
        out, first = self.out, self.first
        self.pload[j] -= len(batch)
        touched = set()
        nd = len(self.dwait)
        for r in batch:
            first[r] = now
            if out[r] == 1:
                self.last[r] = now
                self.pkv[j] -= self.inp[r]
                continue
            k = 0 if nd == 1 else min(range(nd), key=lambda i: self.dload[i])
            self.dload[k] += 1
            self.dwait[k].append(r)
            touched.add(k)
        for k in touched:
            self.admit(k, now)
        if self.pp == 1:
            self.pbusy[j] = False
        self.start_prefill(j, now)

    def admit(self, k: int, now: float) -> None:
        w, inp, out = self.dwait[k], self.inp, self.out
        while w:
            r = w[0]
            need = inp[r] + out[r]
            if self.dkv[k] + need > self.dcap or self.dactive[k] >= self.dmax:
                break
            w.popleft()
            self.dkv[k] += need
            self.dactive[k] += 1
            self.push(now + inp[r] * self.xfer, XFER, k, r)

    def transferred(self, k: int, r: int, now: float) -> None:
        j = self.src[r]
        self.pkv[j] -= self.inp[r]
        self.start_prefill(j, now)
        lanes = self.lanes[k]
        li = 0 if len(lanes) == 1 else min(range(len(lanes)), key=lambda i: lanes[i].load)
        lane = lanes[li]
        lane.pending.append(r)
        if lane.state == 0:
            self.boundary(k, lane, now)
        else:
            end = lane.cut(now)
            if end is not None:
                self.push(end, LANE, k, (li, lane.version))

    def boundary(self, k: int, lane: Lane, now: float) -> None:
        inp, out = self.inp, self.out
        done = lane.advance() if lane.state == 1 else ()
        for r in done:
            self.last[r] = now
            lane.leave(self.off[r])
            self.dkv[k] -= inp[r] + out[r]
            self.dactive[k] -= 1
            self.dload[k] -= 1
        for r in lane.pending:
            self.off[r] = lane.join(r, inp[r] + 1, out[r] - 1)
        lane.pending.clear()
        if lane.B:
            end = lane.plan(now, self.coeffs)
            self.push(end, LANE, k, (self.lanes[k].index(lane), lane.version))
        else:
            lane.state = 0
        if done:
            self.admit(k, now)
