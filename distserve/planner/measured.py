"""Measured step latencies (a CSV anyone can write from their own cluster) as the roofline's
efficiency factors for one hardware generation.

The table, one step per row (columns in any order; `#` starts a comment line):

    model,hardware,tp,pp,phase,batch,tokens,latency_ms,source
    meta-llama/Llama-3.1-8B,h100-80g,1,1,prefill,1,4000,88,vLLM on H100 ...
    meta-llama/Llama-3.1-8B,h100-80g,2,1,decode,128,4000,15.3,vLLM on H100 ...

- prefill: `batch` prompts of `tokens` tokens each, start to first token;
- decode: one step of `batch` requests at a context of `tokens` tokens each.
`model` is a catalogue name or a config.json path, `hardware` one of the hardware table's.

The roofline's efficiency factors (roofline.py: launch, weight reads, GEMM, attention, KV
reads, all-reduce) are fitted on these rows directly (non-negative least squares on relative
error, per phase, decode below and from the batch threshold apart), pulled gently towards the
factors of the profile it refines (a ridge: a table of a few rows decides what they measure
and leaves the rest as the profile had it), so a table of a few measured shapes gives
latencies for every model, TP and batch on that generation's hardware. Pure Python.
"""
from __future__ import annotations

import csv
import functools
import os

import numpy as np

from distserve.planner.hardware import get_hardware
from distserve.planner.profiles import DATA, THRESHOLD

COLUMNS = ("model", "hardware", "tp", "pp", "phase", "batch", "tokens", "latency_ms")
BUILTIN_TABLES = {   # hardware generation -> the measured table shipped for it
    "hopper": os.path.join(DATA, "measured-hopper.csv"),
}


def is_table(path: str) -> bool:
    return str(path).lower().endswith(".csv")


def read_table(path: str) -> list[dict]:
    """The rows of a measured table, checked: every bad value is named with its line."""
    from distserve.planner.models import get_model
    if not os.path.exists(path):
        raise FileNotFoundError(f"measured latency table {path!r} not found")
    with open(path, encoding="utf-8", newline="") as f:
        lines = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: the table lacks column(s) {', '.join(missing)} "
                         f"(needs {', '.join(COLUMNS)})")
    rows = []
    for i, raw in enumerate(reader, start=2):
        try:
            row = {"model": get_model(raw["model"].strip()), "hardware": get_hardware(raw["hardware"]),
                   "tp": int(raw["tp"]), "pp": int(raw["pp"]), "phase": raw["phase"].strip(),
                   "batch": int(raw["batch"]), "tokens": int(raw["tokens"]),
                   "latency_ms": float(raw["latency_ms"]), "source": (raw.get("source") or "").strip()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}, row {i}: {e}") from None
        if row["phase"] not in ("prefill", "decode"):
            raise ValueError(f"{path}, row {i}: phase must be prefill or decode, got {row['phase']!r}")
        if min(row["tp"], row["pp"], row["batch"], row["tokens"]) < 1 or not row["latency_ms"] > 0:
            raise ValueError(f"{path}, row {i}: tp, pp, batch and tokens must be >= 1 and "
                             "latency_ms > 0")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the table has no rows")
    if len({r["hardware"].generation for r in rows}) > 1:
        raise ValueError(f"{path}: one table per hardware generation (it mixes "
                         f"{sorted({r['hardware'].generation for r in rows})})")
    return rows


def _shape(row: dict) -> tuple[str, tuple[float, float, float]]:
    """(phase key, the multipliers of a, b, c) of a row's step: the profile forms'."""
    b, n = row["batch"], row["tokens"]
    if row["phase"] == "prefill":
        return "prefill", (1.0, float(b * n), float(b * n * n))
    return ("small" if b < THRESHOLD else "large"), (1.0, float(b * (n + 1)), float(b))


def _row_terms(row: dict) -> tuple[str, list[float]]:
    """(phase key, the time in ms each efficiency factor multiplies) of a row's step at its TP
    (the roofline has no PP term)."""
    from distserve.planner.roofline import _features, physical_terms
    phase, shape = _shape(row)
    feats = _features(physical_terms(row["model"], row["hardware"], row["tp"]))
    return phase, [float(np.dot(f, shape)) for f in feats["prefill" if phase == "prefill" else "decode"]]


def predict(row: dict, theta: dict) -> float:
    """The fitted roofline's time (ms) for a row's step."""
    phase, terms = _row_terms(row)
    return float(sum(t * x for t, x in zip(theta[phase], terms)))


@functools.lru_cache(maxsize=8)
def fit_table(path: str, base: tuple | None = None) -> dict:
    """Efficiency factors per phase ("prefill", "small", "large") fitted on the table's rows;
    a phase without rows keeps `base`'s (a calibrated profile's, as a tuple of items)."""
    x = {"prefill": [], "small": [], "large": []}
    for row in read_table(path):
        phase, terms = _row_terms(row)
        x[phase].append([term / row["latency_ms"] for term in terms])
    prior = dict(base) if base else {}
    theta = {}
    for phase, feats in x.items():
        if feats:
            theta[phase] = _ridge_nnls(np.array(feats), prior.get(phase))
        elif phase in prior:
            theta[phase] = tuple(prior[phase])
        elif phase == "large" and "small" in theta:   # no large-batch rows: the small fit
            theta[phase] = theta["small"]
        else:
            raise ValueError(f"{path}: no {phase} rows, and no profile to take its factors from")
    return theta


RIDGE = 0.05   # weight of the prior against one row's relative error


def _ridge_nnls(x: np.ndarray, prior) -> tuple:
    """theta >= 0 with x @ theta ~ 1 (each row's time over its measurement), near `prior`."""
    from distserve.planner.roofline import _nnls
    rows, target = [x], [np.ones(len(x))]
    if prior is not None:
        w = np.sqrt(RIDGE)
        for i, b in enumerate(prior):
            r = np.zeros(x.shape[1])
            r[i] = w / (b if b > 0 else 1.0)
            rows.append(r[None, :])
            target.append(np.array([w if b > 0 else 0.0]))
    return tuple(float(t) for t in _nnls(np.vstack(rows), np.concatenate(target)))


def factors_for(table: str, profile_path: str = "distserve") -> dict:
    """The efficiency factors fitted on `table`, with those calibrated on the profile as the
    prior."""
    from distserve.planner.roofline import calibrate
    return fit_table(table, tuple(calibrate(profile_path).items()))


def table_for(hardware) -> str | None:
    """The measured table shipped for this hardware's generation, if any."""
    path = BUILTIN_TABLES.get(hardware.generation)
    return path if path and os.path.exists(path) else None
