"""The benchmark's arithmetic: pure functions over per-request records, with the paper's
definitions (shared/reference/README.md) and vllm bench serve's names.

- TTFT: from sending the request to its first token (the server's queueing included).
- TPOT: (time of last token - time of first token) / (output_len - 1); 0 when output_len is 1.
- ITL: the gaps between successive streamed chunks after the first (TTFT is not an ITL).
- E2EL: from sending to the end of the response stream.
- attainment: share of ALL requests (failed ones never meet an SLO) meeting both SLOs, or
  one of them; an SLO not given is met by every successful request.
- request goodput (vLLM's): requests meeting the SLOs per second of benchmark.
- goodput of a deployment (the paper's): the highest rate whose attainment >= the target,
  interpolated linearly between measured rates (`highest_crossing`); SLO scale: the
  smallest scale reaching the target (`lowest_crossing`).
No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distserve import slo


@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds, relative to its send time
    except `send_time` (relative to the benchmark's start). A failed request keeps what it
    saw, and its `e2el` is the time it took to fail."""

    input_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    output_len: int = 0
    send_time: float = 0.0
    ttft: float | None = None
    last_token_time: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)


def tpot(record: RequestRecord) -> float | None:
    if not record.success or record.ttft is None:
        return None
    if record.output_len <= 1:
        return 0.0
    last = record.last_token_time if record.last_token_time is not None else record.ttft
    return (last - record.ttft) / (record.output_len - 1)


def meets(record: RequestRecord, ttft_slo: float | None, tpot_slo: float | None) -> tuple[bool, bool]:
    """(meets the TTFT SLO, meets the TPOT SLO); never for a failed request (distserve.slo)."""
    if not record.success:
        return False, False
    return slo.meets(record.ttft, tpot(record), ttft_slo, tpot_slo)


def attainment(records: list[RequestRecord], ttft_slo: float | None,
               tpot_slo: float | None) -> tuple[float, float, float]:
    """Shares of all requests meeting (both SLOs, the TTFT SLO, the TPOT SLO); 0 of none."""
    ok = [r.success for r in records]
    shares = slo.attainment([r.ttft if s else None for r, s in zip(records, ok)],
                            [tpot(r) if s else None for r, s in zip(records, ok)], ttft_slo, tpot_slo)
    return shares if shares is not None else (0.0, 0.0, 0.0)


def distribution_ms(values: list[float], name: str, percentiles=(50, 90, 99)) -> dict:
    """vLLM-style keys: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p90_ttft_ms, ... (None if empty)."""
    arr = np.asarray(values, dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(arr.mean()) if arr.size else None,
           f"std_{name}_ms": float(arr.std()) if arr.size else None}
    for p in percentiles:
        key = f"median_{name}_ms" if p == 50 else f"p{p:g}_{name}_ms"
        out[key] = float(np.percentile(arr, p)) if arr.size else None
    return out


def summarize(records: list[RequestRecord], duration: float, ttft_slo: float | None = None,
              tpot_slo: float | None = None) -> dict:
    """The numbers of one benchmark run (no per-request lists)."""
    ok = [r for r in records if r.success]
    duration = max(duration, 1e-9)
    has_slo = ttft_slo is not None or tpot_slo is not None
    both, ttft_share, tpot_share = attainment(records, ttft_slo, tpot_slo)
    good = sum(all(meets(r, ttft_slo, tpot_slo)) for r in ok)
    input_tokens = sum(r.input_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    out = {
        "duration": duration,
        "num_requests": len(records),
        "num_success": len(ok),
        "num_failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if has_slo else None,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_slo": ttft_slo,
        "tpot_slo": tpot_slo,
        "slo_attainment": both if has_slo else None,
        "ttft_attainment": ttft_share if has_slo else None,
        "tpot_attainment": tpot_share if has_slo else None,
    }
    out.update(distribution_ms([r.ttft for r in ok], "ttft"))
    out.update(distribution_ms([tpot(r) for r in ok if r.output_len > 1], "tpot"))
    out.update(distribution_ms([gap for r in ok for gap in r.itl], "itl"))
    out.update(distribution_ms([r.e2el for r in ok], "e2el"))
    return out


@dataclass
class Crossing:
    """Where an attainment curve crosses the target. bound: "interpolated" (between two
    measured points), "lower_bound" (every rate met it: the goodput is at least `value`),
    "upper_bound" (every scale met it: the smallest scale is at most `value`), "not_reached"
    (no measured point met it; value None)."""

    value: float | None
    bound: str


def _interpolate(x0: float, y0: float, x1: float, y1: float, target: float) -> float:
    if y1 == y0:
        return x0
    return x0 + (target - y0) * (x1 - x0) / (y1 - y0)


def _sorted_points(xs, ys):
    if len(xs) != len(ys) or not xs:
        raise ValueError("need as many attainments as x values, and at least one")
    return zip(*sorted(zip(xs, ys)))


def highest_crossing(xs: list[float], ys: list[float], target: float) -> Crossing:
    """Goodput: the highest x at which the piecewise-linear curve through (xs, ys) is >= target."""
    xs, ys = map(list, _sorted_points(xs, ys))
    above = [i for i, y in enumerate(ys) if y >= target]
    if not above:
        return Crossing(None, "not_reached")
    i = above[-1]
    if i == len(xs) - 1:
        return Crossing(xs[i], "lower_bound")
    return Crossing(_interpolate(xs[i], ys[i], xs[i + 1], ys[i + 1], target), "interpolated")


def lowest_crossing(xs: list[float], ys: list[float], target: float) -> Crossing:
    """SLO scale: the lowest x at which the piecewise-linear curve through (xs, ys) is >= target."""
    xs, ys = map(list, _sorted_points(xs, ys))
    above = [i for i, y in enumerate(ys) if y >= target]
    if not above:
        return Crossing(None, "not_reached")
    i = above[0]
    if i == 0:
        return Crossing(xs[0], "upper_bound")
    return Crossing(_interpolate(xs[i - 1], ys[i - 1], xs[i], ys[i], target), "interpolated")
