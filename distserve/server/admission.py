"""Admission: a bound on the requests waiting for their first token, so that a burst gets a
429 with Retry-After at the door instead of queueing without end (and memory with it).

A request counts from the moment it is submitted until its first output (or its end); one
HTTP request with n choices counts n. Imports no torch.
"""
from __future__ import annotations

from distserve.server.errors import APIError

DEFAULT_MAX_QUEUED = 512
RETRY_AFTER_BUSY_S = "1"


class Admission:
    def __init__(self, max_queued: int | None = DEFAULT_MAX_QUEUED) -> None:
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"--max-queued-requests must be >= 1, got {max_queued}")
        self.max_queued = max_queued
        self.waiting = 0
        self.num_rejected = 0

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
