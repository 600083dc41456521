"""Admission: a bound on the requests waiting for their first token, so that a burst gets a
429 with Retry-After at the door instead of queueing without end (and memory with it); and,
with --reject-late, a 429 for a request whose first token cannot come within the TTFT SLO
(its predicted queueing + prefill, at the prefill speed the instances measure, exceeds it):
better refused at once than served late, when it would only push later requests late too.

A request counts from the moment it is submitted until its first output (or its end); one
HTTP request with n choices counts n. Imports no torch.
"""
from __future__ import annotations

from distserve.server.errors import APIError

DEFAULT_MAX_QUEUED = 512
RETRY_AFTER_BUSY_S = "1"


class Admission:
    def __init__(self, max_queued: int | None = DEFAULT_MAX_QUEUED,
                 late_after_s: float | None = None) -> None:
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"--max-queued-requests must be >= 1, got {max_queued}")
        self.max_queued = max_queued
        self.late_after_s = late_after_s   # the TTFT SLO, with --reject-late
        self.waiting = 0
        self.num_rejected = 0
        self.num_rejected_late = 0

    def check_late(self, predicted_ttft_s: float | None) -> None:
        """429 when the request's predicted TTFT is over the SLO (nothing is known: admitted)."""
        if self.late_after_s is None or predicted_ttft_s is None or predicted_ttft_s <= self.late_after_s:
            return
        self.num_rejected_late += 1
        raise APIError(429, f"the first token would come in about {predicted_ttft_s:.2f} s, past the "
                       f"TTFT SLO of {self.late_after_s:g} s (--reject-late); retry later",
                       "slo_unattainable", headers={"Retry-After": RETRY_AFTER_BUSY_S})

    def admit(self, n: int = 1) -> None:
        """Counts n more waiting requests, or refuses them all with a 429."""
        if self.max_queued is not None and self.waiting + n > self.max_queued:
            self.num_rejected += n
            raise APIError(429, f"the server is busy: {self.waiting} requests are waiting for "
                           f"their first token (at most {self.max_queued}); retry later",
                           "too_many_requests", headers={"Retry-After": RETRY_AFTER_BUSY_S})
        self.waiting += n

    def started(self, n: int = 1) -> None:
        """n of them got their first output, or ended before it."""
        self.waiting -= n
