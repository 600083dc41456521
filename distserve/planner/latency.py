"""The latency model of an instance: its profile entry (distserve.planner.profiles) or, for a
(model, TP) the profile lacks, the roofline calibrated on that profile
(distserve.planner.roofline), with its PP degree. With PP stages p, a prefill batch spends
prefill_ms / p + stage_ms * p in each stage, and a decode micro-batch decode_factor *
decode_ms / p per stage (so decode_factor * decode_ms through the whole pipeline). stage_ms
is the artifact's provisional PP_STAGE_MS and decode_factor 1, unless the profile holds what
`distserve profile --pp` measured ("_pipeline"). Pure Python: never imports torch.
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
    stage_ms: float = PP_STAGE_MS     # a prefill batch's extra time per stage is stage_ms * pp
    decode_factor: float = 1.0        # a decode micro-batch's time over decode_ms, with PP

    def prefill_stage(self, sum_len: float, sum_sq: float) -> float:
        """Seconds a prefill batch spends in each pipeline stage."""
        a, b, c = self.entry.prefill
        return ((a + b * sum_len + c * sum_sq) / self.pp + (self.stage_ms * self.pp if self.pp > 1 else 0.0)) * 1e-3

    def prefill(self, lens) -> float:
        """Seconds from the start of a prefill batch to its first tokens (all stages)."""
        lens = np.asarray(lens, dtype=float)
        return self.pp * self.prefill_stage(lens.sum(), (lens * lens).sum())

    def decode_coeffs(self, batch: int) -> tuple[float, float, float]:
        """(a, b, c) in seconds of one decode step through every stage:
        a + b * sum(context + 1) + c * batch."""
        e = self.entry
        a, b, c = e.decode_small if batch < e.threshold else e.decode_large
        f = (self.decode_factor if self.pp > 1 else 1.0) * 1e-3
        return a * f, b * f, c * f

    def decode(self, context_lens) -> float:
        ctx = np.asarray(context_lens, dtype=float)
        a, b, c = self.decode_coeffs(ctx.size)
        return a + b * context_term(ctx, self.entry.decode_context) + c * ctx.size


def instance_latency(model, tp: int, pp: int = 1, profile: str | Profile | None = "distserve",
                     hardware=None) -> InstanceLatency:
    """The latency of an instance of `model` (a ModelSpec) with TP `tp` and PP `pp`: the
    profile's entry when it has one; else the roofline, with efficiency factors fitted on a
    measured table (`profile` a .csv: measured.py), or on the table shipped for `hardware`'s
    generation when the profile was made on another one, or else on the profile."""
    from distserve.planner.measured import factors_for, is_table, table_for
    from distserve.planner.roofline import profile_path
    if isinstance(profile, str) and is_table(profile):
        hw = hardware or get_hardware("a100-80g")
        return InstanceLatency(roofline_entry(model, hw, tp, theta=factors_for(profile)), tp, pp,
                               f"roofline fitted on {profile}")
    if isinstance(profile, str):
        profile = load_profile(profile)
    if profile is not None and hardware is not None and hardware.name != profile.hardware:
        table = table_for(hardware)
        if table and get_hardware(profile.hardware).generation != hardware.generation:
            theta = factors_for(table, profile_path(profile))
            return InstanceLatency(roofline_entry(model, hardware, tp, theta=theta), tp, pp,
                                   f"roofline ({hardware.generation} factors from "
                                   f"{table.rsplit('/', 1)[-1]})")
    entry = profile.get(model.name, tp) if profile is not None else None
    pipeline = {}
    if profile is not None and (hardware is None or hardware.name == profile.hardware):
        pipeline = profile.pipeline(model.name, pp)
    if entry is not None and (hardware is None or hardware.name == profile.hardware):
        return InstanceLatency(entry, tp, pp, "profile", **pipeline)
    hw = hardware or get_hardware(profile.hardware if profile is not None else "a100-80g")
    return InstanceLatency(roofline_entry(model, hw, tp, profile), tp, pp, "roofline", **pipeline)
