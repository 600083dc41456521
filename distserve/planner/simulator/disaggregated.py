"""The disaggregated deployment in the simulator: prefill and decode on their own instances.

A request goes to the prefill instance that the controller would pick (distserve.dispatch:
the fewest prompt tokens queued or running); a prefill instance batches prompts FCFS up to a
token budget and its KV room, through its PP stages (the latency model's pipeline: one
batch at a time, or one per stage when interleaved); its KV stays until a decode instance
pulls it. When the first token is out the request goes to the decode instance holding the
fewest requests, which admits FCFS while its KV pool holds the whole request (prompt + output:
no preemption), then pulls the KV (bytes / link bandwidth), frees the prefill side, and
batches it continuously (into one of its PP lanes when interleaved). As in our engine, the
pull is part of the decode step that admits the request: that step starts only when the
pulls of the requests joining it are done, so every request decoding on the instance waits
for them (`pull_stalls_decode`; False: pulls overlap decoding, the request joins when its own
is done).
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from distserve.dispatch import least_loaded
from distserve.planner.simulator.common import INF, InstanceConfig, SimResult, decode_coeffs, result
from distserve.planner.simulator.lane import Lane
from distserve.planner.workload import Trace

PF_FREE, PF_DONE, XFER, LANE = 0, 1, 2, 3


@dataclass(frozen=True)
class Disaggregated:
    prefill: InstanceConfig
    decode: InstanceConfig
    num_prefill: int = 1
    num_decode: int = 1
    kv_bytes_per_token: float = 0.0
    link_bandwidth: float = INF            # bytes/s between a prefill and a decode instance
    pull_stalls_decode: bool = True        # a pull holds up the decode step it joins

    @property
    def num_gpus(self) -> int:
        p, d = self.prefill.latency, self.decode.latency
        return self.num_prefill * p.tp * p.pp + self.num_decode * d.tp * d.pp


def simulate_disaggregated(trace: Trace, d: Disaggregated) -> SimResult:
    return _Disaggregated(trace, d).run()


class _Disaggregated:
    def __init__(self, trace: Trace, d: Disaggregated) -> None:
        self.arr, self.inp, self.out = trace.arrival.tolist(), trace.input_len.tolist(), trace.output_len.tolist()
        n = len(self.arr)
        self.first, self.last, self.off, self.src = [INF] * n, [INF] * n, [0] * n, [0] * n
        self.heap: list = []
        self.seq = 0
        P, D = d.prefill, d.decode
        self.pcap, self.dcap, self.dmax = P.kv_capacity, D.kv_capacity, D.max_batch
        self.budget = P.max_num_batched_tokens or P.kv_capacity
        self.plat = P.latency
        self.pp = P.pp if P.latency.interleaved else 1   # stages that hold a batch each
        self.xfer = d.kv_bytes_per_token / d.link_bandwidth if d.link_bandwidth < INF else 0.0
        self.stall = d.pull_stalls_decode and self.xfer > 0
        self.coeffs = decode_coeffs(D.latency)
        self.pq = [deque() for _ in range(d.num_prefill)]
        self.pkv, self.pqueued = [0] * d.num_prefill, [0] * d.num_prefill   # KV, prompt tokens queued
        self.pbusy = [False] * d.num_prefill
        self.stage_free = [[0.0] * self.pp for _ in range(d.num_prefill)]
        self.dwait = [deque() for _ in range(d.num_decode)]
        self.dkv, self.dactive, self.dload = [0] * d.num_decode, [0] * d.num_decode, [0] * d.num_decode
        padded = D.latency.entry.decode_context == "max"
        self.lanes = [[Lane(padded) for _ in range(D.latency.lanes)] for _ in range(d.num_decode)]

    def push(self, t: float, kind: int, x, y) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, x, y))

    def run(self) -> SimResult:
        arr, inp, out, heap = self.arr, self.inp, self.out, self.heap
        n, ai = len(arr), 0
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
                elif kind == PF_FREE:
                    self.pbusy[x] = False
                    self.start_prefill(x, t)
                else:
                    self.other_event(t, kind, x, y)
            elif ai < n:
                r, t = ai, arr[ai]
                ai += 1
                if inp[r] > self.pcap or inp[r] + out[r] > self.dcap:
                    continue   # fits no instance: never served
                j = self.pick_prefill()
                self.src[r] = j
                self.pq[j].append(r)
                self.pqueued[j] += inp[r]
                self.start_prefill(j, t)
            else:
                break
        return result(arr, self.first, self.last, out)

    def pick_prefill(self) -> int:
        """The prefill instance a new request goes to."""
        return 0 if len(self.pq) == 1 else least_loaded(self.pqueued)

    def pick_decode(self) -> int:
        """The decode instance a prefilled request goes to."""
        return 0 if len(self.dwait) == 1 else least_loaded(self.dload)

    def other_event(self, now: float, kind: int, x, y) -> None:
        raise ValueError(f"unknown event kind {kind}")

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
        self.pbusy[j] = True
        if self.pp == 1:
            self.push(now + self.plat.prefill_batch(len(batch), tot, sq), PF_DONE, j, batch)
            return
        st = self.plat.prefill_stage(tot, sq)
        free, t = self.stage_free[j], now
        for s in range(self.pp):
            t = max(t, free[s]) + st
            free[s] = t
        self.push(t, PF_DONE, j, batch)
        self.push(now + st, PF_FREE, j, None)

    def prefilled(self, j: int, batch: list, now: float) -> None:
        out, first = self.out, self.first
        self.pqueued[j] -= sum(self.inp[r] for r in batch)
        touched = set()
        for r in batch:
            first[r] = now
            if out[r] == 1:
                self.last[r] = now
                self.pkv[j] -= self.inp[r]
                continue
            k = self.pick_decode()
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
            if self.stall:   # pulled at the start of the step it joins (boundary)
                self.transferred(k, r, now)
            else:
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
        pulls = sum(inp[r] for r in lane.pending) * self.xfer if self.stall else 0.0
        for r in lane.pending:
            self.off[r] = lane.join(r, inp[r] + 1, out[r] - 1)
        lane.pending.clear()
        if lane.B:
            end = lane.plan(now + pulls, self.coeffs)
            self.push(end, LANE, k, (self.lanes[k].index(lane), lane.version))
        else:
            lane.state = 0
        if done:
            self.admit(k, now)
