"""What both simulated deployments share: an instance's configuration, the result of a run
(per-request TTFT and TPOT) and the decode step coefficients. Times are seconds; TTFT and TPOT
follow the reference definitions; a request that fits no instance gets infinite TTFT and TPOT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distserve import slo

from distserve.planner.latency import InstanceLatency

INF = math.inf


@dataclass(frozen=True)
class InstanceConfig:
    latency: InstanceLatency
    kv_capacity: int                       # KV tokens the instance holds
    max_batch: int = 10 ** 7               # requests decoding at once
    max_num_batched_tokens: int | None = None  # prompt tokens per prefill batch (None: the KV room,
                                           # as the artifact); a longer prompt runs alone

    @property
    def pp(self) -> int:
        return self.latency.pp


@dataclass
class SimResult:
    ttft: np.ndarray
    tpot: np.ndarray

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        """Share of requests meeting both SLOs (1 of none: nothing was missed)."""
        shares = slo.attainment(self.ttft, self.tpot, ttft_slo, tpot_slo)
        return shares[0] if shares is not None else 1.0


def result(arrival: list, first: list, last: list, out: list) -> SimResult:
    first_a, last_a, out_a = np.array(first), np.array(last), np.array(out, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out_a > 1, (last_a - first_a) / np.maximum(out_a - 1, 1), 0.0)
    tpot[~np.isfinite(first_a)] = INF
    return SimResult(first_a - np.array(arrival), tpot)


def decode_coeffs(latency: InstanceLatency):
    """B -> (a, b, c) in seconds of one decode step (of one lane), memoised per batch size."""
    cache: dict = {}

    def coeffs(b: int):
        c = cache.get(b)
        if c is None:
            c = cache[b] = latency.decode_coeffs(b)
        return c
    return coeffs
