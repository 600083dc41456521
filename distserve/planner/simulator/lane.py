"""A decode lane: a continuous batch that steps in closed form between membership changes.

Between a join and a finish every step of the batch costs a + b * S + c * B, where B is the
batch size and S = sum(context + 1) grows by B per step, so k steps take
  T(k) = k * (a + c * B + b * S0) + b * B * k * (k - 1) / 2
and the simulator jumps a whole segment in one event instead of one event per token. A
pipeline-parallel instance runs PP lanes (its micro-batches) that share the KV pool.
A padded lane (an engine whose decode attention pads to the longest context) has
S = B * (longest context + 1) instead, which also grows by B per step: same closed form.
"""
from __future__ import annotations

import heapq
import math


class Lane:
    __slots__ = ("members", "B", "base", "t0", "s0", "k", "p", "q", "version", "pending",
                 "state", "step", "batch", "partial", "padded", "offs", "gone")

    def __init__(self, padded: bool = False) -> None:
        self.members: list = []     # heap of (finish step, request)
        self.B = 0                  # requests in the batch
        self.base = 0               # S at step s is base + B * s
        self.t0 = 0.0               # start time of the current segment
        self.s0 = 0                 # lane step count at the segment start
        self.k = 0                  # steps planned in the segment
        self.p = 0.0                # first step's time of the segment (s)
        self.q = 0.0                # half the per-step growth of the step time (s)
        self.version = 0            # bumps when the planned segment end moves
        self.pending: list = []     # requests ready to join at the next boundary
        self.state = 0              # 0 idle, 1 decoding, 2 running a prefill iteration
        self.step = 0               # lane step count (at the last boundary)
        self.batch: list = []       # colocated: prompts (or chunks) in the running iteration
        self.partial = None         # colocated, chunked: [request, tokens done] being prefilled
        self.padded = padded        # S is B * (the longest member's ctx) instead of the sum
        self.offs: list = []        # padded: max-heap (negated) of member offsets, lazily pruned
        self.gone: dict = {}        # padded: offsets of members that left, not yet pruned

    @property
    def load(self) -> int:
        return self.B + len(self.pending)

    def seg_time(self, k: int) -> float:
        return k * self.p + self.q * k * (k - 1)

    def steps_until(self, dt: float) -> int:
        """The smallest k >= 1 whose boundary is at least dt after the segment start (dt < 0:
        the segment has not started yet, held up by a pull)."""
        if dt <= 0.0:
            return 1
        p, q = self.p, self.q
        if q <= 0.0:
            k = max(1, math.ceil(dt / p - 1e-12))
        else:
            lin = p - q
            k = max(1, math.ceil((-lin + math.sqrt(lin * lin + 4.0 * q * dt)) / (2.0 * q) - 1e-9))
            while k > 1 and self.seg_time(k - 1) >= dt:
                k -= 1
            while self.seg_time(k) < dt:
                k += 1
        return k

    def join(self, req: int, ctx: int, steps: int) -> int:
        """Add a request whose S term is `ctx` now and that needs `steps` steps; returns the
        offset that `leave` takes back when it finishes."""
        heapq.heappush(self.members, (self.step + steps, req))
        off = ctx - self.step
        self.base += off
        self.B += 1
        if self.padded:
            heapq.heappush(self.offs, -off)
        return off

    def ctx_sum(self) -> int:
        """The S term of the next step: sum of the members' ctx, or B * the longest if padded."""
        if not self.padded:
            return self.base + self.B * self.step
        offs, gone = self.offs, self.gone
        while offs and gone.get(-offs[0]):
            gone[-offs[0]] -= 1
            heapq.heappop(offs)
        return self.B * (self.step - offs[0]) if offs else 0

    def plan(self, now: float, coeffs) -> float:
        """Start a decode segment at `now` up to the next finish; returns its end time."""
        a, b, c = coeffs(self.B)
        self.t0, self.s0, self.state = now, self.step, 1
        self.k = self.members[0][0] - self.step
        self.p = a + c * self.B + b * self.ctx_sum()
        self.q = 0.5 * b * self.B
        self.version += 1
        return now + self.seg_time(self.k)

    def cut(self, now: float) -> float | None:
        """Move the segment end to the first boundary at or after `now`; returns the new end,
        or None when the planned end is already that boundary."""
        k = self.steps_until(now - self.t0)
        if k >= self.k:
            return None
        self.k = k
        self.version += 1
        return self.t0 + self.seg_time(k)

    def advance(self) -> list:
        """End the segment: step forward and pop the finished requests."""
        self.step = self.s0 + self.k
        done = []
        members = self.members
        while members and members[0][0] <= self.step:
            done.append(heapq.heappop(members)[1])
        return done

    def leave(self, off: int) -> None:
        self.base -= off
        self.B -= 1
        if self.padded:
            self.gone[off] = self.gone.get(off, 0) + 1
