"""SLO attainment and goodput over a sliding window of finished requests.

A request attains as distserve.slo defines it; goodput is the number of attaining requests
finished in the window, per second. An empty window shows attainment 1 (nothing missed).
"""
from __future__ import annotations

import time
from collections import deque

from distserve.slo import meets


class SLOWindow:
    def __init__(self, ttft_slo: float, tpot_slo: float, window_s: float = 60.0) -> None:
        if ttft_slo <= 0 or tpot_slo <= 0:
            raise ValueError(f"SLOs must be > 0, got TTFT {ttft_slo} s and TPOT {tpot_slo} s")
        if window_s <= 0:
            raise ValueError(f"the SLO window must be > 0 s, got {window_s}")
        self.ttft_slo, self.tpot_slo, self.window_s = ttft_slo, tpot_slo, window_s
        self._done: deque[tuple[float, bool, bool]] = deque()  # (finish time, ttft ok, tpot ok)
        self._started = time.monotonic()

    def record(self, ttft: float, tpot: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._done.append((now, *meets(ttft, tpot, self.ttft_slo, self.tpot_slo)))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        self._trim(now)
        n = len(self._done)
        both = sum(1 for _, a, b in self._done if a and b)
        span = min(self.window_s, max(now - self._started, 1e-9))
        return {
            "requests": n,
            "attainment": both / n if n else 1.0,
            "ttft_attainment": sum(1 for _, a, _ in self._done if a) / n if n else 1.0,
            "tpot_attainment": sum(1 for _, _, b in self._done if b) / n if n else 1.0,
            "goodput": both / span,
        }
