"""Latency profiles: the fitted forms of the DistServe artifact, their files and their fits.

In milliseconds, per (model, TP):
  prefill_ms = a + b * sum(len) + c * sum(len^2)
  decode_ms  = a + b * sum(context_len + 1) + c * batch   ("smallbs" below the threshold,
                                                             "largebs" from it on)
An engine whose decode attention pads every request to the batch's longest context (ours on
CPU: one SDPA call over [batch, longest context]) pays for batch * (longest context + 1)
instead of sum(context + 1): such an entry says "decoding_context": "max" (default "sum",
the artifact's paged attention); `distserve profile` finds out which by timing mixed batches.
Profiles load from the artifact's JSON schema as is: {model: {tp: entry}}; top-level keys that
start with "_" hold metadata. The latency of an instance (with its PP stages, or from the
roofline where the profile has no entry) is distserve.planner.latency. Pure Python.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "data")
BUILTIN_PROFILES = {  # name -> file; "vllm" is the artifact's fit of the colocated baseline
    "distserve": os.path.join(DATA, "profiler-a100-80g.distserve.json"),
    "vllm": os.path.join(DATA, "profiler-a100-80g.vllm.json"),
}
THRESHOLD = 95      # the artifact's decode batch size where "largebs" coefficients take over


@dataclass(frozen=True)
class PipelineCost:
    """What a synchronous pipeline of p stages adds to a step. With m micro-batches of n tokens
    each (rows, for decode) and T(n) one micro-batch's step at PP 1, the step takes
        T(n) * (1 + (m - 1) * bottleneck / p) + (m + p - 2) * (hop_ms + hop_ms_per_token * n)
    : the first micro-batch through every stage, each other one a slowest-stage time behind
    it (bottleneck: that stage's share of the work x p, 1 when the stages are even), and the
    handovers between stages. Unmeasured: even stages and free handovers."""
    bottleneck: float = 1.0
    hop_ms: float = 0.0
    hop_ms_per_token: float = 0.0

    def factors(self, m: int, p: int) -> tuple[float, int]:
        """(what one micro-batch's step is multiplied by, the handovers) of a step of m
        micro-batches through p stages."""
        return 1 + (m - 1) * self.bottleneck / p, m + p - 2

    def step_ms(self, fixed_ms: float, variable_ms: float, m: int, p: int, tokens: float) -> float:
        """A step whose PP-1 time is fixed_ms + variable_ms over its whole batch, split in m
        micro-batches of tokens / m tokens each."""
        g, hops = self.factors(m, p)
        return ((fixed_ms + variable_ms / m) * g
                + hops * (self.hop_ms + self.hop_ms_per_token * tokens / m))

    def to_dict(self) -> dict:
        return {"bottleneck": self.bottleneck, "hop_ms": self.hop_ms,
                "hop_ms_per_token": self.hop_ms_per_token}


@dataclass(frozen=True)
class ProfileEntry:
    """One (model, TP) of a profile: three [a, b, c] triples in milliseconds."""
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int = THRESHOLD
    decode_context: str = "sum"    # "sum": sum(ctx + 1); "max": batch * (max ctx + 1), padded

    def __post_init__(self) -> None:
        if self.decode_context not in ("sum", "max"):
            raise ValueError(f"decoding_context must be 'sum' or 'max', got {self.decode_context!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileEntry":
        try:
            return cls(tuple(map(float, d["prefill"])), tuple(map(float, d["decoding_smallbs"])),
                       tuple(map(float, d["decoding_largebs"])),
                       int(d.get("decoding_large_small_bs_threshold", THRESHOLD)),
                       str(d.get("decoding_context", "sum")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad profile entry {d!r}: need prefill, decoding_smallbs and "
                             f"decoding_largebs as [a, b, c] ({e})") from None

    def to_dict(self) -> dict:
        d = {"decoding_large_small_bs_threshold": self.threshold, "prefill": list(self.prefill),
             "decoding_smallbs": list(self.decode_small), "decoding_largebs": list(self.decode_large)}
        if self.decode_context != "sum":
            d["decoding_context"] = self.decode_context
        return d

    def prefill_ms(self, lens) -> float:
        a, b, c = self.prefill
        lens = np.asarray(lens, dtype=float)
        return a + b * lens.sum() + c * (lens * lens).sum()

    def decode_ms(self, context_lens) -> float:
        """One decode step of a batch whose requests hold `context_lens` tokens before it."""
        ctx = np.asarray(context_lens, dtype=float)
        return self.decode_ms_of(ctx.size, float(ctx.sum()), float(ctx.max()) if ctx.size else 0.0)

    def decode_ms_of(self, batch: int, context_sum: float, context_max: float) -> float:
        """decode_ms of a batch known only by its size, context sum and longest context (what
        a live instance reports: distserve.cluster.messages.StepSample)."""
        a, b, c = self.decode_small if batch < self.threshold else self.decode_large
        term = context_sum + batch if self.decode_context == "sum" else batch * (context_max + 1)
        return a + b * term + c * batch


@dataclass(frozen=True)
class Profile:
    """A latency profile file: {model name: {tp: ProfileEntry}} plus free-form metadata."""
    entries: dict
    meta: dict

    @classmethod
    def load(cls, path: str) -> "Profile":
        path = BUILTIN_PROFILES.get(path, path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"latency profile {path!r} not found; give a JSON file in the "
                                    f"DistServe artifact's schema or one of: {', '.join(BUILTIN_PROFILES)}")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        profile = cls.from_dict(raw)
        profile.meta["_path"] = path   # the roofline calibrates on the same profile
        return profile

    @classmethod
    def from_dict(cls, raw: dict) -> "Profile":
        if not isinstance(raw, dict):
            raise ValueError("a latency profile is a JSON object {model: {tp: entry}}")
        entries = {m.lower(): {int(tp): ProfileEntry.from_dict(e) for tp, e in tps.items()}
                   for m, tps in raw.items() if not m.startswith("_")}
        return cls(entries, {k: v for k, v in raw.items() if k.startswith("_")})

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.meta.items() if k != "_path"}
        for m, tps in self.entries.items():
            out[m] = {str(tp): e.to_dict() for tp, e in sorted(tps.items())}
        return out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    def get(self, model: str, tp: int) -> ProfileEntry | None:
        return self.entries.get(model.lower(), {}).get(tp)

    def pipeline(self, model: str, pp: int) -> dict:
        """What `distserve profile --pp` measured for PP `pp` of `model`, as InstanceLatency's
        fields: the synchronous pipeline's cost per phase ({"prefill_pipe", "decode_pipe"}),
        or {} (even stages, free handovers)."""
        for name, by_pp in self.meta.get("_pipeline", {}).items():
            if name.lower() == model.lower() and str(pp) in by_pp:
                m = by_pp[str(pp)]
                if "prefill" not in m:   # a profile made before the synchronous model
                    return {}
                return {"prefill_pipe": PipelineCost(**m["prefill"]),
                        "decode_pipe": PipelineCost(**m["decode"])}
        return {}

    @property
    def hardware(self) -> str:
        return self.meta.get("_hardware", "a100-80g")


@functools.lru_cache(maxsize=16)
def load_profile(path: str) -> Profile:
    return Profile.load(path)


def relative_lstsq(x, times_ms) -> tuple[float, ...]:
    """Coefficients that minimise the squared *relative* errors of x @ coef against the times.
    Step times span two orders of magnitude (a 16-token prefill to a 2,000-token one); plain
    least squares fits the long ones and leaves the short ones tens of percent off (on one
    CPU: an intercept of -211 ms, 310% off at 16 tokens), while the error reported and the
    one the simulator suffers is relative."""
    t = np.asarray(times_ms, float)
    w = 1.0 / np.maximum(t, 1e-9)
    return tuple(float(v) for v in np.linalg.lstsq(np.asarray(x, float) * w[:, None], t * w,
                                                   rcond=None)[0])


def fit_prefill(lens_batches, times_ms) -> tuple[float, float, float]:
    """[a, b, c] of prefill_ms = a + b*sum(len) + c*sum(len^2) (relative least squares)."""
    x = np.array([[1.0, float(np.sum(b)), float(np.sum(np.square(b, dtype=float)))] for b in lens_batches])
    return relative_lstsq(x, times_ms)


def context_term(ctx, form: str = "sum") -> float:
    """The decode form's context term: sum(ctx + 1), or batch * (max ctx + 1) when padded."""
    ctx = np.asarray(ctx, dtype=float)
    if not ctx.size:
        return 0.0
    return float((ctx + 1).sum()) if form == "sum" else float(ctx.size * (ctx.max() + 1))


def fit_decode(batches, times_ms, context: str = "sum") -> tuple[float, float, float]:
    """Relative least-squares [a, b, c] of decode_ms = a + b*sum(ctx+1) + c*batch over context lists
    (context="max": a + b*batch*(max ctx+1) + c*batch)."""
    x = np.array([[1.0, context_term(c, context), float(len(c))] for c in batches])
    return relative_lstsq(x, times_ms)
