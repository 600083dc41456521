"""How results are shown and kept: vllm bench serve's printed block plus SLO attainment, the
sweep table, and JSON files (the per-request records included).

Formats only: no measuring, no network."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from distserve.bench.metrics import Crossing, RequestRecord, tpot

WIDTH = 50
SECTIONS = (("ttft", "TTFT", "Time to First Token"),
            ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl", "ITL", "Inter-token Latency"),
            ("e2el", "E2EL", "End-to-end Latency"))


def _row(label: str, value) -> str:
    if value is None:
        return "{:<40} {:<10}".format(label, "n/a")
    if isinstance(value, float):
        return "{:<40} {:<10.2f}".format(label, value)
    return "{:<40} {:<10}".format(label, value)


def _header(title: str, fill: str = "-") -> str:
    return f"{title:{fill}^{WIDTH}}"


def _pct(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def format_result(result: dict) -> str:
    """The vLLM-style block for one run, then the SLO attainment section."""
    lines = [_header(" Serving Benchmark Result ", "=")]
    lines.append(_row("Successful requests:", result["num_success"]))
    lines.append(_row("Failed requests:", result["num_failed"]))
    if result.get("max_concurrency"):
        lines.append(_row("Maximum request concurrency:", result["max_concurrency"]))
    rate = result.get("request_rate")
    lines.append(_row("Request rate configured (req/s):", rate if isinstance(rate, str) else float(rate)))
    lines.append(_row("Benchmark duration (s):", result["duration"]))
    lines.append(_row("Total input tokens:", result["total_input_tokens"]))
    lines.append(_row("Total generated tokens:", result["total_output_tokens"]))
    lines.append(_row("Request throughput (req/s):", result["request_throughput"]))
    lines.append(_row("Request goodput (req/s):", result["request_goodput"]))
    lines.append(_row("Output token throughput (tok/s):", result["output_throughput"]))
    lines.append(_row("Total Token throughput (tok/s):", result["total_token_throughput"]))
    for key, short, title in SECTIONS:
        lines.append(_header(title))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            lines.append(_row(f"{label} {short} (ms):", result.get(f"{stat}_{key}_ms")))
    lines.append(_header("SLO Attainment"))
    for key, label in (("ttft_slo", "TTFT SLO (ms):"), ("tpot_slo", "TPOT SLO (ms):")):
        lines.append(_row(label, None if result.get(key) is None else 1000.0 * result[key]))
    lines.append(_row("Both SLOs met (%):", _pct(result.get("slo_attainment"))))
    lines.append(_row("TTFT SLO met (%):", _pct(result.get("ttft_attainment"))))
    lines.append(_row("TPOT SLO met (%):", _pct(result.get("tpot_attainment"))))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def record_json(record: RequestRecord) -> dict:
    out = dataclasses.asdict(record)
    out["tpot"] = tpot(record)
    return out


def rate_json(rate: float):
    """inf is not JSON: write it as the string "inf", as vllm bench serve does."""
    return "inf" if math.isinf(rate) else rate


def _crossing_text(crossing: Crossing, unit: str, per_gpu: float | None) -> str:
    if crossing.value is None:
        return "not reached at any measured point"
    text = f"{crossing.value:.3f}{unit}"
    if per_gpu is not None:
        gpus = f"{per_gpu:g} GPU" + ("" if per_gpu == 1 else "s")
        text = f"{crossing.value / per_gpu:.3f}{unit} per GPU ({gpus}; {crossing.value:.3f}{unit} in all)"
    hint = {"interpolated": "interpolated", "lower_bound": "at least: met at every rate measured",
            "upper_bound": "at most: met at every scale measured"}[crossing.bound]
    return f"{text} ({hint})"


def format_sweep(sweep: dict) -> str:
    """The table of a rate or SLO-scale sweep and the crossing found."""
    by_rate = sweep["kind"] == "rate_sweep"
    x_label = "rate (req/s)" if by_rate else "SLO scale"
    lines = [_header(f" {'Rate' if by_rate else 'SLO Scale'} Sweep ", "="),
             (f"{x_label:>12} {'throughput':>10} {'goodput':>9} {'both %':>7} {'TTFT %':>7} "
              f"{'TPOT %':>7} {'failed':>6}")]
    for p in sweep["points"]:
        x = p["request_rate"] if by_rate else p["slo_scale"]
        x = x if isinstance(x, str) else f"{x:g}"
        goodput = "n/a" if p["request_goodput"] is None else f"{p['request_goodput']:.3f}"
        lines.append(f"{x:>12} {p['request_throughput']:>10.3f} {goodput:>9} "
                     f"{100 * p['slo_attainment']:>7.1f} {100 * p['ttft_attainment']:>7.1f} "
                     f"{100 * p['tpot_attainment']:>7.1f} {p['num_failed']:>6}")
    crossing = Crossing(sweep["crossing"]["value"], sweep["crossing"]["bound"])
    target = f"{100 * sweep['attainment_target']:g}%"
    if by_rate:
        lines.append(f"Goodput at {target} attainment: "
                     + _crossing_text(crossing, " req/s", sweep["num_gpus"]))
    else:
        lines.append(f"Smallest SLO scale reaching {target} attainment: " + _crossing_text(crossing, "", None))
    if not sweep.get("monotonic", True):
        lines.append(f"Note: attainment should fall as the {'rate rises' if by_rate else 'SLO tightens'} but "
                     f"does not here; more prompts per run reduce the noise.")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def save_json(path: str, data: dict) -> None:
    """Write atomically, so an interrupted save never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
