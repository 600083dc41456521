"""The latency model of an instance: its profile entry (distserve.planner.profiles) or, for a
(model, TP) the profile lacks, the roofline calibrated on that profile
(distserve.planner.roofline), with its PP degree and how its pipeline runs.

Two pipelines (`schedule`):
- "synchronous", our engine's: a step splits its batch into m = min(PP, rows) micro-batches
  that pass the PP stages in turn (forward only), and the next step starts when the last one
  is out. Its cost (PipelineCost) is one micro-batch's way through every stage, the other
  m - 1 behind it at the slowest stage (the bubbles), and the handovers between stages, each
  fitted per phase from PP instances timed by `distserve profile --pp`.
- "interleaved", the paper artifact's: PP batches in flight, one per stage; a prefill batch
  spends prefill_ms / p + stage_ms * p in each stage, and a decode micro-batch decode_factor
  * decode_ms / p per stage, PP micro-batches side by side (the artifact's provisional
  PP_STAGE_MS and decode_factor 1). benchmarks/paper.py uses it to reproduce the paper.
Pure Python: never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from distserve.planner.hardware import get_hardware
from distserve.planner.profiles import (PipelineCost, Profile, ProfileEntry, context_term,
                                        load_profile)
from distserve.planner.roofline import roofline_entry

PP_STAGE_MS = 1.0   # per-stage pipeline constant of the artifact's prefill model (provisional)
SCHEDULES = ("synchronous", "interleaved")


@dataclass(frozen=True)
class InstanceLatency:
    """The latency model of one instance: an entry for its TP degree, and its PP degree.
    Times in seconds; `source` says where the coefficients came from (profile or roofline)."""
    entry: ProfileEntry
    tp: int = 1
    pp: int = 1
    source: str = "profile"
    stage_ms: float = PP_STAGE_MS     # interleaved: a prefill batch's extra time per stage is stage_ms * pp
    decode_factor: float = 1.0        # interleaved: a decode micro-batch's time over decode_ms
    schedule: str = "synchronous"     # how the pipeline runs (the module's docstring)
    prefill_pipe: PipelineCost = PipelineCost()   # synchronous: per phase
    decode_pipe: PipelineCost = PipelineCost()

    @property
    def interleaved(self) -> bool:
        return self.pp > 1 and self.schedule == "interleaved"

    @property
    def lanes(self) -> int:
        """Decode batches in flight at once: PP of them interleaved, else one."""
        return self.pp if self.interleaved else 1

    def prefill_stage(self, sum_len: float, sum_sq: float) -> float:
        """Interleaved: seconds a prefill batch spends in each pipeline stage."""
        a, b, c = self.entry.prefill
        return ((a + b * sum_len + c * sum_sq) / self.pp + (self.stage_ms * self.pp if self.pp > 1 else 0.0)) * 1e-3

    def prefill_batch(self, prompts: int, sum_len: float, sum_sq: float) -> float:
        """Seconds from the start of a prefill batch of `prompts` prompts to its first tokens."""
        if self.interleaved:
            return self.pp * self.prefill_stage(sum_len, sum_sq)
        a, b, c = self.entry.prefill
        return self.pipelined(self.prefill_pipe, a, b * sum_len + c * sum_sq, prompts, sum_len) * 1e-3

    def prefill_busy(self, prompts: int, sum_len: float, sum_sq: float) -> float:
        """Seconds before the instance can start its next prefill batch: one stage's time when
        batches follow each other through the stages (interleaved), else the whole step."""
        if self.interleaved:
            return self.prefill_stage(sum_len, sum_sq)
        return self.prefill_batch(prompts, sum_len, sum_sq)

    def prefill(self, lens) -> float:
        """Seconds from the start of a prefill batch to its first tokens (all stages)."""
        lens = np.asarray(lens, dtype=float)
        return self.prefill_batch(lens.size, lens.sum(), (lens * lens).sum())

    def pipelined(self, pipe: PipelineCost, fixed_ms: float, variable_ms: float, rows: int,
                  tokens: float) -> float:
        """Milliseconds of a synchronous step of `rows` sequences (`tokens` in all) whose PP-1
        time is fixed_ms + variable_ms."""
        if self.pp == 1 or rows < 1:
            return fixed_ms + variable_ms
        return pipe.step_ms(fixed_ms, variable_ms, min(self.pp, rows), self.pp, tokens)

    def decode_coeffs(self, batch: int) -> tuple[float, float, float]:
        """(a, b, c) in seconds of one decode step of `batch` requests through every stage:
        a + b * sum(context + 1) + c * batch (interleaved: of one lane's micro-batch)."""
        e = self.entry
        a, b, c = e.decode_small if batch < e.threshold else e.decode_large
        if self.pp == 1:
            return a * 1e-3, b * 1e-3, c * 1e-3
        if self.interleaved:
            f = self.decode_factor * 1e-3
            return a * f, b * f, c * f
        m, q = min(self.pp, max(batch, 1)), self.decode_pipe
        g, hops = q.factors(m, self.pp)   # PipelineCost.step_ms, term by term
        return ((a * g + hops * q.hop_ms) * 1e-3, b * g / m * 1e-3,
                (c * g / m + hops * q.hop_ms_per_token / m) * 1e-3)

    def decode(self, context_lens) -> float:
        ctx = np.asarray(context_lens, dtype=float)
        a, b, c = self.decode_coeffs(ctx.size)
        return a + b * context_term(ctx, self.entry.decode_context) + c * ctx.size


def instance_latency(model, tp: int, pp: int = 1, profile: str | Profile | None = "distserve",
                     hardware=None, schedule: str = "synchronous") -> InstanceLatency:
    """The latency of an instance of `model` (a ModelSpec) with TP `tp` and PP `pp`, whose
    pipeline runs as `schedule` says (the module's docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown PP schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    return replace(_latency(model, tp, pp, profile, hardware), schedule=schedule)


def _latency(model, tp: int, pp: int, profile, hardware) -> InstanceLatency:
    """The profile's entry when it has one; else the roofline, with efficiency factors fitted
    on a measured table (`profile` a .csv: measured.py), or on the table shipped for
    `hardware`'s generation when the profile was made on another one, or else on the profile.
    The PP model is the profile's (`distserve profile --pp`) for its own hardware."""
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
