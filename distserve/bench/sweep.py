"""Runs and sweeps: a run's result document, a rate sweep (one run per rate, each with its own
seed so no prompt repeats across runs and a prefix cache cannot flatter later ones), and an SLO
scale sweep (one run; attainment recomputed per scale: the SLOs do not change what the server
does). The crossing of the attainment target gives the deployment's goodput."""

from __future__ import annotations

import datetime
import math

from distserve.bench import metrics
from distserve.bench.report import rate_json, record_json
from distserve.bench.runner import RunConfig
from distserve.bench.workload import Workload, length_stats


def parse_values(spec: str, name: str) -> list[float]:
    """"0.5,1,2,4", a range "start:stop:step" (stop included), or "inf" (rates only)."""
    values: list[float] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if ":" in part:
                start, stop, step = (float(v) for v in part.split(":"))
                if step <= 0 or stop < start:
                    raise ValueError
                count = int(math.floor((stop - start) / step + 1e-9)) + 1
                values.extend(round(start + k * step, 10) for k in range(count))
            else:
                values.append(float(part))
    except ValueError:
        raise ValueError(f"{name} {spec!r}: expected numbers like 0.5,1,2 or a range start:stop:step") from None
    if not values or any(v <= 0 or math.isnan(v) for v in values):
        raise ValueError(f"{name} {spec!r}: every value must be > 0")
    return sorted(set(values))


def make_result(cfg: RunConfig, workload: Workload, records: list, duration: float,
                ttft_slo: float | None, tpot_slo: float | None, extra: dict | None = None) -> dict:
    """The JSON document of one run: settings, vLLM-style summary, one record per request."""
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "base_url": cfg.base_url, "endpoint": cfg.endpoint, "model": cfg.model,
        "dataset": workload.name, "dataset_note": workload.note,
        "num_prompts": len(workload.requests), "request_rate": rate_json(cfg.request_rate),
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency, "seed": cfg.seed,
        "ignore_eos": cfg.ignore_eos, **(extra or {}),
    }
    result.update(metrics.summarize(records, duration, ttft_slo, tpot_slo))
    result["workload_lengths"] = length_stats(workload.requests)
    result["requests"] = [record_json(r) for r in records]
    return result


def _point(result: dict, **extra) -> dict:
    keys = ("request_rate", "request_throughput", "request_goodput", "slo_attainment",
            "ttft_attainment", "tpot_attainment", "num_success", "num_failed", "duration")
    return {**{k: result[k] for k in keys}, **extra}


def rate_sweep(results: list[dict], target: float, num_gpus: int) -> dict:
    """Points (rate, attainments) of finished runs and the goodput where attainment crosses
    `target` (a fraction); rate inf is listed but not interpolated."""
    points = [_point(r) for r in results]
    finite = [p for p in points if not isinstance(p["request_rate"], str)]
    crossing = (metrics.highest_crossing([p["request_rate"] for p in finite],
                                         [p["slo_attainment"] for p in finite], target)
                if finite else metrics.Crossing(None, "not_reached"))
    attained = [p["slo_attainment"] for p in finite]
    return {"kind": "rate_sweep", "attainment_target": target, "num_gpus": num_gpus, "points": points,
            "monotonic": all(a >= b for a, b in zip(attained, attained[1:])),
            "crossing": {"value": crossing.value, "bound": crossing.bound},
            "goodput": crossing.value,
            "per_gpu_goodput": None if crossing.value is None else crossing.value / num_gpus}


def scale_sweep(records: list, result: dict, scales: list[float], ttft_slo: float | None,
                tpot_slo: float | None, target: float) -> dict:
    """Attainment of one run's records with both SLOs multiplied by each scale."""
    points = []
    for scale in scales:
        t = None if ttft_slo is None else ttft_slo * scale
        p = None if tpot_slo is None else tpot_slo * scale
        both, ttft_share, tpot_share = metrics.attainment(records, t, p)
        good = sum(all(metrics.meets(r, t, p)) for r in records)
        points.append({"slo_scale": scale, "request_rate": result["request_rate"],
                       "request_throughput": result["request_throughput"],
                       "request_goodput": good / max(result["duration"], 1e-9),
                       "slo_attainment": both, "ttft_attainment": ttft_share,
                       "tpot_attainment": tpot_share, "num_failed": result["num_failed"],
                       "ttft_slo": t, "tpot_slo": p})
    crossing = metrics.lowest_crossing(scales, [q["slo_attainment"] for q in points], target)
    attained = [q["slo_attainment"] for q in points]
    return {"kind": "scale_sweep", "attainment_target": target, "points": points,
            "monotonic": all(a <= b for a, b in zip(attained, attained[1:])),
            "crossing": {"value": crossing.value, "bound": crossing.bound},
            "min_slo_scale": crossing.value}
