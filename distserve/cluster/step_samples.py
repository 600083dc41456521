"""How fast an instance's engine iterations run, as the controller learns it: each model step
that ran one phase alone (prefill only or decode only), timed as the simulator times an
iteration (to the next step's start when that follows at once: sampling, sending and a decode
instance's KV pulls count), sent with the instance's Stats. `serve --adapt` weighs them
against the plan's latency profile (distserve.planner.adapt.measured_speed), so it scores
splits at the speed the machine runs now rather than the one it was profiled at.
Only switchable instances (under --adapt) sample: the hook costs a CUDA sync per step.
Imports no torch.
"""
from __future__ import annotations

from collections import deque

from distserve.cluster.messages import StepSample

BACK_TO_BACK_S = 0.02   # a step that starts within this of the last one's end continues it


class StepSampler:
    def __init__(self, chained=None, limit: int = 256) -> None:
        self.chained = chained          # another on_step hook (the step trace), called first
        self._open: tuple | None = None  # (start, end, shape) of the last step, not yet timed
        self._ready: deque[StepSample] = deque(maxlen=limit)

    def on_step(self, start: float, end: float, prefills, decodes) -> None:
        """The model runner's hook: prefills as (request, tokens), decodes as requests."""
        if self.chained is not None:
            self.chained(start, end, prefills, decodes)
        self._close(start)
        if prefills and not decodes:
            self._open = (start, end, StepSample(0.0, [n for _, n in prefills]))
        elif decodes and not prefills:
            ctx = [r.num_tokens for r in decodes]
            self._open = (start, end, StepSample(0.0, [], len(ctx), sum(ctx), max(ctx)))

    def _close(self, next_start: float) -> None:
        if self._open is None:
            return
        start, end, sample = self._open
        sample.seconds = (next_start if next_start - end < BACK_TO_BACK_S else end) - start
        self._ready.append(sample)
        self._open = None

    def take(self, now: float) -> list[StepSample]:
        """The steps timed since the last take (the last one once no step followed it at once)."""
        if self._open is not None and now - self._open[1] >= BACK_TO_BACK_S:
            self._close(now)
        out = list(self._ready)
        self._ready.clear()
        return out
