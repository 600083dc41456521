"""Roofline latency model (the paper's Appendix A form), calibrated on fitted profiles.

For a (model, hardware, TP) each coefficient of the artifact's fitted forms is a sum of
physical times, each weighted by an efficiency factor theta:
  prefill  a = th1 * layers + th2 * weights/TP/bandwidth         (launch and weight reads)
           b = th3 * GEMM FLOPs per token/TP/peak + th4 * TP all-reduce time per token
           c = th5 * attention FLOPs per squared token/TP/peak   (2 * layers * heads * head_dim)
  decode   a = th1 * layers + th2 * weights/TP/bandwidth
           b = th3 * KV bytes per context token/TP/bandwidth
           c = th4 * GEMM FLOPs per token/TP/peak + th5 * all-reduce time per token
(decode has one theta set below the batch threshold and one from it on). Predicted times are
linear in theta, so calibration is a non-negative least squares over the shapes of a grid,
weighted by 1/time (relative error), against every (model, TP) entry of a profile whose
hardware is known. Other hardware reuses the factors with its own peaks.
"""
from __future__ import annotations

import functools

import numpy as np

from distserve.planner.profiles import THRESHOLD, Profile, ProfileEntry, load_profile

PREFILL_GRID = [(k, n) for n in (64, 128, 256, 512, 1024, 2048) for k in (1, 2, 4)]
DECODE_CTX = (128, 512, 1024, 2048)
SMALL_BATCHES = (1, 2, 4, 8, 16, 32, 64, 94)
LARGE_BATCHES = (95, 128, 192, 256, 384, 512)


def physical_terms(model, hw, tp: int) -> dict:
    """The physical times (ms) that the coefficients are made of."""
    mem = model.weight_bytes / tp / hw.mem_bandwidth * 1e3
    gemm = (model.flops_per_token() + 2.0 * model.hidden * model.vocab) / tp / hw.flops * 1e3
    attn = 2.0 * model.layers * model.q_dim / tp / hw.flops * 1e3
    kv = model.kv_bytes_per_token / tp / hw.mem_bandwidth * 1e3
    comm = 0.0
    if tp > 1:   # two ring all-reduces of the hidden state per layer
        comm = model.layers * 2 * 2 * (tp - 1) / tp * model.hidden * model.dtype_bytes / hw.link_bandwidth * 1e3
    return {"layers": float(model.layers), "mem": mem, "gemm": gemm, "attn": attn, "kv": kv, "comm": comm}


def _features(p: dict) -> dict:
    """Per phase, the coefficient each theta multiplies: [(a-part, b-part, c-part)] per theta."""
    return {
        "prefill": [(p["layers"], 0, 0), (p["mem"], 0, 0), (0, p["gemm"], 0), (0, p["comm"], 0), (0, 0, p["attn"])],
        "decode": [(p["layers"], 0, 0), (p["mem"], 0, 0), (0, p["kv"], 0), (0, 0, p["gemm"]), (0, 0, p["comm"])],
    }


def _shapes(phase: str) -> list[tuple[float, float, float]]:
    """(1, x1, x2) rows: the multipliers of a, b, c for each shape of the grid."""
    if phase == "prefill":
        return [(1.0, k * n, k * n * n) for k, n in PREFILL_GRID]
    batches = SMALL_BATCHES if phase == "small" else LARGE_BATCHES
    return [(1.0, bs * (ctx + 1), bs) for bs in batches for ctx in DECODE_CTX]


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with theta >= 0 (active set: drop what comes out negative, refit)."""
    active = list(range(x.shape[1]))
    theta = np.zeros(x.shape[1])
    while active:
        sol = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        if (sol >= 0).all():
            theta[active] = sol
            break
        active = [a for a, s in zip(active, sol) if s > 0] if (sol > 0).any() else []
    return theta


@functools.lru_cache(maxsize=8)
def calibrate(profile_path: str = "distserve") -> dict:
    """Efficiency factors per phase ("prefill", "small", "large") fitted on a profile."""
    from distserve.planner.hardware import get_hardware
    from distserve.planner.models import get_model
    profile = load_profile(profile_path)
    hw = get_hardware(profile.hardware)
    rows = {"prefill": [], "small": [], "large": []}
    targets = {"prefill": [], "small": [], "large": []}
    for name, tps in profile.entries.items():
        try:
            model = get_model(name)
        except ValueError:
            continue
        for tp, entry in tps.items():
            feats = _features(physical_terms(model, hw, tp))
            for phase, coeffs, kind in (("prefill", entry.prefill, "prefill"),
                                        ("small", entry.decode_small, "decode"),
                                        ("large", entry.decode_large, "decode")):
                for shape in _shapes(phase):
                    t = float(np.dot(coeffs, shape))
                    if t <= 0:
                        continue
                    rows[phase].append([np.dot(f, shape) / t for f in feats[kind]])
                    targets[phase].append(1.0)
    if not rows["prefill"]:
        raise ValueError("the profile has no model the catalogue knows; cannot calibrate the roofline")
    return {phase: tuple(_nnls(np.array(rows[phase]), np.array(targets[phase]))) for phase in rows}


def profile_path(profile: Profile | str | None) -> str:
    if isinstance(profile, str):
        return profile
    if profile is not None and profile.meta.get("_path"):
        return profile.meta["_path"]
    return "distserve"


def roofline_entry(model, hw, tp: int, profile: Profile | str | None = "distserve",
                   theta: dict | None = None) -> ProfileEntry:
    """A profile entry for (model, hardware, TP) from the roofline calibrated on `profile`
    (or with the efficiency factors `theta`, fitted elsewhere: measured.py)."""
    theta = theta or calibrate(profile_path(profile))
    feats = _features(physical_terms(model, hw, tp))

    def combine(kind: str, th) -> tuple[float, float, float]:
        return tuple(float(sum(t * f[i] for t, f in zip(th, feats[kind]))) for i in range(3))

    return ProfileEntry(combine("prefill", theta["prefill"]), combine("decode", theta["small"]),
                        combine("decode", theta["large"]), THRESHOLD)


def relative_error(entry: ProfileEntry, reference: ProfileEntry) -> dict:
    """Mean absolute relative error of `entry` against `reference` over the calibration grid."""
    out = {}
    for phase, mine, ref in (("prefill", entry.prefill, reference.prefill),
                             ("small", entry.decode_small, reference.decode_small),
                             ("large", entry.decode_large, reference.decode_large)):
        shapes = np.array(_shapes(phase))
        out[phase] = float(np.mean(np.abs(shapes @ np.array(mine) / (shapes @ np.array(ref)) - 1)))
    return out
