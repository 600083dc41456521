"""The colocated baseline in the simulator: prefill and decode share each instance.

Prefill-first (vLLM's default, as the artifact simulates it): at every iteration boundary an
instance runs queued prompts (FCFS, up to a token budget and its KV room) before any decode
step, pausing the running batch. Chunked prefill: each iteration carries every running
request's decode token plus prompt chunks filling a token budget (time: the larger fixed cost
of the two fits, plus each fit's token terms; a chunk of x tokens after y done costs
c * (x^2 + 2xy) in attention). A request is admitted when the KV pool holds all of it
(no preemption). A PP instance runs its pipeline as the latency model says: one
iteration at a time through the stages (ours), or PP lanes sharing the queue and the KV pool
(the artifact's interleaved pipeline).
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, replace

from distserve.dispatch import least_loaded
from distserve.planner.simulator.common import INF, InstanceConfig, SimResult, decode_coeffs, result
from distserve.planner.simulator.lane import Lane
from distserve.planner.workload import Trace


CHUNKED_BUDGET = 512   # tokens per chunked-prefill iteration when none is given (vLLM's old default)


@dataclass(frozen=True)
class Colocated:
    instance: InstanceConfig
    num_instances: int = 1
    chunked: bool = False

    @property
    def num_gpus(self) -> int:
        lat = self.instance.latency
        return self.num_instances * lat.tp * lat.pp


def simulate_colocated(trace: Trace, c: Colocated) -> SimResult:
    return _Colocated(trace, c).run()


class _Colocated:
    def __init__(self, trace: Trace, c: Colocated) -> None:
        self.arr, self.inp, self.out = trace.arrival.tolist(), trace.input_len.tolist(), trace.output_len.tolist()
        n = len(self.arr)
        self.first, self.last, self.off = [INF] * n, [INF] * n, [0] * n
        self.heap, self.seq = [], 0
        inst = c.instance
        self.cap, self.maxb = inst.kv_capacity, inst.max_batch
        self.chunked = c.chunked
        self.budget = inst.max_num_batched_tokens or (CHUNKED_BUDGET if c.chunked else inst.kv_capacity)
        lat = self.lat = inst.latency
        a, b, cc = lat.entry.prefill
        pp = lat.pp
        self.pf = ((a + (lat.stage_ms * pp * pp if lat.interleaved else 0.0)) * 1e-3, b * 1e-3, cc * 1e-3)
        self.coeffs = decode_coeffs(lat)
        # a chunked iteration's decode rows at PP 1; a synchronous pipeline is applied to the
        # whole iteration (mixed)
        self.mix_coeffs = decode_coeffs(lat if lat.interleaved else replace(lat, pp=1))
        m = c.num_instances
        self.queue = [deque() for _ in range(m)]
        self.kv, self.load = [0] * m, [0] * m
        padded = inst.latency.entry.decode_context == "max"
        self.lanes = [[Lane(padded) for _ in range(lat.lanes)] for _ in range(m)]

    def run(self):
        arr, inp, out, heap = self.arr, self.inp, self.out, self.heap
        n, ai, m = len(arr), 0, len(self.queue)
        while True:
            if heap and (ai >= n or heap[0][0] <= arr[ai]):
                t, _, i, li, version = heapq.heappop(heap)
                lane = self.lanes[i][li]
                if lane.version == version:
                    self.boundary(i, li, t)
            elif ai < n:
                r, t = ai, arr[ai]
                ai += 1
                if inp[r] + out[r] > self.cap:
                    continue
                i = 0 if m == 1 else least_loaded(self.load)
                self.queue[i].append(r)
                self.load[i] += 1
                self.poke(i, t)
            else:
                break
        return result(arr, self.first, self.last, out)

    def push(self, t: float, i: int, li: int, version: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, i, li, version))

    def poke(self, i: int, now: float) -> None:
        """New prompts are queued: idle lanes start now, decoding lanes stop at their next step."""
        for li, lane in enumerate(self.lanes[i]):
            if not self.queue[i]:
                return
            if lane.state == 0:
                self.boundary(i, li, now)
            elif lane.state == 1:
                end = lane.cut(now)
                if end is not None:
                    self.push(end, i, li, lane.version)

    def boundary(self, i: int, li: int, now: float) -> None:
        lane, inp, out = self.lanes[i][li], self.inp, self.out
        if lane.state in (1, 3):
            for r in lane.advance():
                self.last[r] = now
                lane.leave(self.off[r])
                self.kv[i] -= inp[r] + out[r]
                self.load[i] -= 1
        for r in lane.batch:   # prompts finished in the iteration that just ended
            self.first[r] = now
            if out[r] == 1:
                self.last[r] = now
                self.kv[i] -= inp[r] + out[r]
                self.load[i] -= 1
            else:
                self.off[r] = lane.join(r, inp[r] + 1, out[r] - 1)
        lane.batch = []
        if self.chunked:
            end = self.mixed(i, lane, now)
        else:
            end = self.prefill(i, lane, now)
        if end is None:
            if not lane.B:
                lane.state = 0
                return
            end = lane.plan(now, self.coeffs)
        self.push(end, i, li, lane.version)

    def take(self, i: int, lane: Lane, room: int) -> tuple[list, int]:
        """Pop queued prompts FCFS while the budget `room` and the KV pool allow."""
        q, inp, out, taken, tot = self.queue[i], self.inp, self.out, [], 0
        while q and lane.B + len(taken) < self.maxb:
            r = q[0]
            if taken and tot + inp[r] > room and not self.chunked:
                break
            if self.kv[i] + inp[r] + out[r] > self.cap or (self.chunked and tot >= room):
                break
            q.popleft()
            self.kv[i] += inp[r] + out[r]
            taken.append(r)
            tot += inp[r]
        return taken, tot

    def prefill(self, i: int, lane: Lane, now: float) -> float | None:
        batch, tot = self.take(i, lane, self.budget)
        if not batch:
            return None
        a, b, c = self.pf
        lane.batch, lane.state = batch, 2
        lane.version += 1
        sq = sum(self.inp[r] ** 2 for r in batch)
        lane.t0 = now
        lane.p = (a + b * tot + c * sq if self.lat.interleaved
                  else self.lat.prefill_batch(len(batch), tot, sq))
        if len(self.lanes[i]) > 1:
            self.contend(i, lane, lane.p / len(self.lanes[i]))
        return now + lane.p

    def contend(self, i: int, owner: Lane, delay: float) -> None:
        """A prompt holds each pipeline stage for its share of the time: the other lanes'
        running iterations wait that long at the stage it occupies."""
        for li, lane in enumerate(self.lanes[i]):
            if lane is owner or lane.state == 0:
                continue
            lane.t0 += delay
            lane.version += 1
            self.push(lane.t0 + (lane.seg_time(lane.k) if lane.state == 1 else lane.p), i, li, lane.version)

    def mixed(self, i: int, lane: Lane, now: float) -> float | None:
        """One chunked-prefill iteration: the batch's decode tokens plus prompt chunks."""
        room = self.budget - lane.B
        chunks = [lane.partial] if lane.partial is not None else []
        lane.partial = None
        used = sum(self.inp[r] - y for r, y in chunks)
        if room > used:
            new, _ = self.take(i, lane, room - used)
            chunks += [[r, 0] for r in new]
        if not chunks or room <= 0:
            if chunks:
                lane.partial = chunks[0]
            return None
        pa, pb, pc = self.pf
        t, left = pa, room
        for r, y in chunks:
            x = min(self.inp[r] - y, left)
            if x <= 0:
                lane.partial = [r, y]
                break
            left -= x
            t += pb * x + pc * (x * x + 2 * x * y)
            if y + x < self.inp[r]:
                lane.partial = [r, y + x]
            else:
                lane.batch.append(r)
        if lane.B:
            da, db, dc = self.mix_coeffs(lane.B)
            t += max(0.0, da - pa) + db * lane.ctx_sum() + dc * lane.B
        if self.lat.pp > 1 and not self.lat.interleaved:   # the iteration through the stages
            rows = len(chunks) + lane.B
            tokens = (room - left) + lane.B
            fixed = max(pa, da) if lane.B else pa
            t = self.lat.pipelined(self.lat.prefill_pipe, fixed * 1e3, (t - fixed) * 1e3,
                                   rows, tokens) * 1e-3
        lane.s0, lane.k, lane.state = lane.step, 1 if lane.B else 0, 3
        lane.version += 1
        return now + t
