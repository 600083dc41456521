"""The latency model of an instance: its profile entry (distserve.planner.profiles) or, for a
(model, TP) the profile lacks, the roofline calibrated on that profile
(distserve.planner.roofline), with its PP degree. With PP stages p, a prefill batch spends
prefill_ms / p + PP_STAGE_MS * p in each stage, and a decode micro-batch decode_ms / p per
stage (so decode_ms through the whole pipeline). Pure Python: never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distserve.planner.hardware import get_hardware
from distserve.planner.profiles import Profile, ProfileEntry, context_term, load_profile
from distserve.planner.roofline import roofline_entry

PP_STAGE_MS = 1.0   # per-stage pipeline constant of the artifact's prefill model (provisional)


@dataclass(frozen=True)
class InstanceLatency:
    """The latency model of one instance: an entry for its TP degree, and its PP degree.
    Times in seconds; `source` says where the coefficients came from (profile or roofline)."""
    entry: ProfileEntry
    tp: int = 1
    pp: int = 1
    source: str = "profile"

    def prefill_stage(self, sum_len: float, sum_sq: float) -> float:
        """Seconds a prefill batch spends in each pipeline stage."""
        a, b, c = self.entry.prefill
        return ((a + b * sum_len + c * sum_sq) / self.pp + (PP_STAGE_MS * self.pp if self.pp > 1 else 0.0)) * 1e-3

    def prefill(self, lens) -> float:
        """Seconds from the start of a prefill batch to its first tokens (all stages)."""
        lens = np.asarray(lens, dtype=float)
        return self.pp * self.prefill_stage(lens.sum(), (lens * lens).sum())

    def decode_coeffs(self, batch: int) -> tuple[float, float, float]:
        """(a, b, c) in seconds of one decode step through every stage:
        a + b * sum(context + 1) + c * batch."""
        e = self.entry
        a, b, c = e.decode_small if batch < e.threshold else e.decode_large
        return a * 1e-3, b * 1e-3, c * 1e-3

    def decode(self, context_lens) -> float:
        ctx = np.asarray(context_lens, dtype=float)
        a, b, c = self.decode_coeffs(ctx.size)
        return a + b * context_term(ctx, self.entry.decode_context) + c * ctx.size


def instance_latency(model, tp: int, pp: int = 1, profile: str | Profile | None = "distserve",
                     hardware=None) -> InstanceLatency:
    """The latency of an instance of `model` (a ModelSpec) with TP `tp` and PP `pp`: the
    profile's entry when it has one, else the roofline calibrated on that profile."""
    if isinstance(profile, str):
        profile = load_profile(profile)
    entry = profile.get(model.name, tp) if profile is not None else None
    if entry is not None and (hardware is None or hardware.name == profile.hardware):
        return InstanceLatency(entry, tp, pp, "profile")
    hw = hardware or get_hardware(profile.hardware if profile is not None else "a100-80g")
    return InstanceLatency(roofline_entry(model, hw, tp, profile), tp, pp, "roofline")
