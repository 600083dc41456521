"""Request traces for the simulator: token lengths and Poisson (or gamma) arrival times.

Lengths come from a synthetic sampler matching the paper's Table 1 statistics (log-normal
input and output lengths, filtered as the artifact filters ShareGPT: both sides >= 4 tokens,
input + output < 2048), from the lengths the bench package measured on the real datasets
(`sharegpt-trace`, ...), from `fixed:IN:OUT`, or from a file of measured lengths (JSON list or
JSONL of objects with input_len/output_len, or prompt_len/output_len as the artifact writes,
or [input_len, output_len] pairs).
Never tokenises anything: the bench package does that for real runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

MIN_LEN = 4


@dataclass(frozen=True)
class LengthDist:
    """Log-normal input and output lengths (mu, sigma of the log), rejection-filtered."""
    name: str
    input_mu: float
    input_sigma: float
    output_mu: float
    output_sigma: float
    max_total_len: int = 2048
    note: str = ""


# mu solved (fixed seed, 200k samples) so the filtered means match Table 1 of the paper.
DATASETS: dict[str, LengthDist] = {d.name: d for d in (
    LengthDist("sharegpt", 6.8053, 1.0, 4.943, 1.0, note="chatbot: mean input ~755, output ~200"),
    LengthDist("humaneval", 5.0802, 0.35, 4.4346, 0.55, note="code completion: mean ~171 / ~98"),
    LengthDist("longbench", 7.5201, 0.12, 4.4343, 0.7, note="summarization: mean ~1738 / ~91"),
)}


# Lengths measured by the bench package's loaders (real prompts, SmolLM2 tokenizer), shipped
# as data and sampled with replacement.
TRACES = {f"{name}-trace": os.path.join(os.path.dirname(__file__), "data", f"lengths-{name}.json")
          for name in DATASETS}


@dataclass
class Trace:
    """n requests: arrival times (s, sorted), input and output lengths (tokens)."""
    arrival: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def max_total_len(self) -> int:
        return int((self.input_len + self.output_len).max()) if len(self) else 0


class Lengths:
    """A source of (input_len, output_len) pairs: sample(n, rng) -> two int arrays."""

    def __init__(self, spec: str):
        self.spec = spec
        self._pairs: np.ndarray | None = None
        self._dist: LengthDist | None = None
        self._fixed: tuple[int, int] | None = None
        if spec in DATASETS:
            self._dist = DATASETS[spec]
        elif spec in TRACES:
            self._pairs = load_lengths(TRACES[spec])
        elif spec.startswith("fixed:"):
            try:
                _, i, o = spec.split(":")
                self._fixed = (int(i), int(o))
            except ValueError:
                raise ValueError(f"bad workload {spec!r}; write fixed:INPUT_LEN:OUTPUT_LEN") from None
            if min(self._fixed) < 1:
                raise ValueError(f"bad workload {spec!r}: lengths must be >= 1")
        elif os.path.exists(spec):
            self._pairs = load_lengths(spec)
        else:
            raise ValueError(f"unknown workload {spec!r}; choose one of {', '.join([*DATASETS, *TRACES])}, "
                             "fixed:IN:OUT, or a JSON/JSONL file of input_len/output_len")

    @classmethod
    def of_pairs(cls, pairs, name: str = "observed") -> Lengths:
        """Lengths drawn from these (input_len, output_len) pairs, e.g. what a server observed."""
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if not len(arr) or arr.min() < 1:
            raise ValueError("need at least one (input_len, output_len) pair of lengths >= 1")
        self = cls.__new__(cls)
        self.spec, self._pairs, self._dist, self._fixed = name, arr, None, None
        return self

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self._fixed is not None:
            return np.full(n, self._fixed[0], np.int64), np.full(n, self._fixed[1], np.int64)
        if self._pairs is not None:
            idx = rng.integers(0, len(self._pairs), n)
            return self._pairs[idx, 0].copy(), self._pairs[idx, 1].copy()
        d = self._dist
        ins, outs, have = [], [], 0
        ri, ro = rng.spawn(2)   # separate streams: the first k of n samples equal those of k
        while have < n:
            m = 2 * (n - have) + 16
            i = np.round(ri.lognormal(d.input_mu, d.input_sigma, m)).astype(np.int64)
            o = np.round(ro.lognormal(d.output_mu, d.output_sigma, m)).astype(np.int64)
            ok = (i >= MIN_LEN) & (o >= MIN_LEN) & (i + o < d.max_total_len)
            ins.append(i[ok]), outs.append(o[ok])
            have += int(ok.sum())
        return np.concatenate(ins)[:n], np.concatenate(outs)[:n]

    @property
    def max_total_len(self) -> int:
        if self._fixed is not None:
            return sum(self._fixed)
        if self._pairs is not None:
            return int(self._pairs.sum(axis=1).max())
        return self._dist.max_total_len


def load_lengths(path: str) -> np.ndarray:
    """(n, 2) int array of input/output lengths from a JSON list or JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("requests", [])
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    pairs = []
    for d in data:
        if isinstance(d, (list, tuple)) and len(d) == 2:
            pairs.append((int(d[0]), int(d[1])))
            continue
        i = d.get("input_len", d.get("prompt_len"))
        o = d.get("output_len")
        if i is None or o is None:
            raise ValueError(f"{path}: each request needs input_len (or prompt_len) and output_len")
        pairs.append((int(i), int(o)))
    if not pairs:
        raise ValueError(f"{path}: no requests")
    return np.array(pairs, dtype=np.int64)


def arrivals(n: int, rate: float, rng: np.random.Generator, burstiness: float = 1.0) -> np.ndarray:
    """Arrival times (s) of n requests at `rate` req/s: Poisson for burstiness 1, else gamma
    inter-arrival gaps of shape `burstiness` (as vllm bench serve and `distserve bench` draw
    them: below 1 burstier, the gaps' coefficient of variation is 1 / sqrt(burstiness))."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if burstiness == 1.0:
        gaps = rng.exponential(1.0 / rate, n)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def make_trace(lengths: Lengths, n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> Trace:
    """A trace whose lengths depend only on the seed, so rates compare on the same requests."""
    ins, outs = lengths.sample(n, np.random.default_rng(seed))
    gaps = arrivals(n, 1.0, np.random.default_rng(seed + 7919), burstiness)
    return Trace(gaps / rate, ins, outs)
