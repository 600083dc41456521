"""SLO attainment as the reference defines it, in one place for the benchmark client, the live
/metrics window, the simulator and the reality check.

A request attains when its TTFT <= the TTFT SLO and its TPOT <= the TPOT SLO (TPOT = (last -
first token) / (output tokens - 1), 0 for one token). A request that failed or was never
served (a latency of None, inf or NaN) meets neither SLO; an SLO of None constrains nothing.
Attainment is the share of requests that attain; of no requests it is undefined (None), and
each caller says what it shows then.
"""
from __future__ import annotations

import math

import numpy as np


def meets(ttft: float | None, tpot: float | None, ttft_slo: float | None,
          tpot_slo: float | None) -> tuple[bool, bool]:
    """(meets the TTFT SLO, meets the TPOT SLO) for one request."""
    return _within(ttft, ttft_slo), _within(tpot, tpot_slo)


def _within(latency: float | None, slo: float | None) -> bool:
    if latency is None or math.isnan(latency) or math.isinf(latency):
        return False
    return slo is None or latency <= slo


def attainment(ttft, tpot, ttft_slo: float | None, tpot_slo: float | None
               ) -> tuple[float, float, float] | None:
    """Shares of requests meeting (both SLOs, the TTFT SLO, the TPOT SLO), over arrays of
    latencies (None, inf or NaN for a request that failed); None for no requests."""
    ttft = np.asarray([np.nan if x is None else x for x in ttft] if isinstance(ttft, list) else ttft, float)
    tpot = np.asarray([np.nan if x is None else x for x in tpot] if isinstance(tpot, list) else tpot, float)
    if not ttft.size:
        return None
    ok_t = np.isfinite(ttft) & (ttft <= (math.inf if ttft_slo is None else ttft_slo))
    ok_p = np.isfinite(tpot) & (tpot <= (math.inf if tpot_slo is None else tpot_slo))
    return float(np.mean(ok_t & ok_p)), float(np.mean(ok_t)), float(np.mean(ok_p))


MAX_TTFT_SLO_S, MAX_TPOT_SLO_S = 120.0, 10.0   # beyond these, an SLO is milliseconds by mistake


def check_slo_seconds(ttft_slo: float | None, tpot_slo: float | None) -> None:
    """Refuses SLOs that are not positive seconds, and ones so large that they must be
    milliseconds given as seconds (--ttft-slo 1000 for one second), saying so."""
    for flag, value, most in (("--ttft-slo", ttft_slo, MAX_TTFT_SLO_S),
                              ("--tpot-slo", tpot_slo, MAX_TPOT_SLO_S)):
        if value is None:
            continue
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
        if value > most:
            raise ValueError(f"{flag} {value:g} is {value:g} seconds, which looks like "
                             f"milliseconds: SLOs are in seconds ({flag} {value / 1000:g} for "
                             f"{value:g} ms)")
