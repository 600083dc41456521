"""When each request of a benchmark is sent: offsets in seconds from the start, seeded.

Follows vllm bench serve: gaps drawn from a gamma distribution of shape `burstiness` and mean
1 / rate (shape 1 is a Poisson process; below 1 is burstier); rate inf sends everything at
once; the first request goes at time 0."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num_requests - 1, 0))
    return [0.0] + np.cumsum(gaps).tolist()
