"""How far ahead the AVX2 linear kernel prefetches its weights, chosen per machine: measured
once, on the first model packed for that kernel, and kept in distserve's cache.

Why: the best distance depends on the CPU's hardware prefetchers and memory, not on the
instruction set. At one row of x over SmolLM2's matrices, 16 blocks ahead streamed 20-21 GB/s
on AMD Zen 3 and no software prefetch 18-21; on AMD Zen 4 with every library held to AVX2,
no prefetch was 1.15-1.6x faster (25-39 GB/s against 22-26). Intel's AVX2-only CPUs were
never measured. So each machine times both on a 64 MB weight (~50 ms) and keeps the faster:
16, unless none is at least 5% faster.

Where: cpu_tuning.json under distserve.cache_dir.cache_root(), keyed by the CPU's model name
and feature flags. DISTSERVE_AVX2_PREFETCH=<blocks> sets the distance without measuring.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
import time

import torch

from distserve import cache_dir, doctor
from distserve.models import huge_pages, paged_kernel

log = logging.getLogger(__name__)

CANDIDATES = (16, 0)          # weight blocks ahead: Zen 3's best first, then none
MARGIN = 0.95                 # a later candidate must take under 95% of the first's time
_WEIGHT_BYTES = 64 << 20      # twice the largest L3 of the machines measured
_applied: int | None = None


def cache_file() -> pathlib.Path:
    return cache_dir.cache_root() / "cpu_tuning.json"


def machine_key() -> str:
    """Changes with the CPU (its model name and feature flags)."""
    name = doctor._cpu_name().encode()
    return hashlib.sha256(name + b"\0" + paged_kernel._cpu_flags()).hexdigest()[:16]


def measure(rounds: int = 6) -> dict[int, float]:
    """Seconds of the fastest pass of the AVX2 kernel at one row over a 64 MB packed weight,
    for each candidate distance, the candidates taking turns (memory speed drifts)."""
    kblocks = 64                               # K = 2048
    blocks = _WEIGHT_BYTES // (kblocks * 2048)
    weight = huge_pages.zeroed_bytes(_WEIGHT_BYTES).view(torch.bfloat16).fill_(0.5)
    weight = weight.view(blocks, kblocks, 16, 32, 2)   # filled: untouched pages read as one
    x = torch.full((1, kblocks * 32), 0.5, dtype=torch.bfloat16)
    out = torch.empty(1, blocks * 32, dtype=torch.bfloat16)
    ops = torch.ops.distserve_cpu
    before = ops.avx2_set_prefetch_blocks(CANDIDATES[0])
    best = {c: float("inf") for c in CANDIDATES}
    try:
        ops.avx2_linear(out, x, weight, None)   # threads started, pages mapped
        for _ in range(rounds):
            for c in CANDIDATES:
                ops.avx2_set_prefetch_blocks(c)
                start = time.perf_counter()
                ops.avx2_linear(out, x, weight, None)
                best[c] = min(best[c], time.perf_counter() - start)
    finally:
        ops.avx2_set_prefetch_blocks(before)
    return best


def choose(seconds: dict[int, float]) -> int:
    """The first candidate, unless a later one takes under MARGIN of its time."""
    first = CANDIDATES[0]
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] < MARGIN * seconds[first] else first


def prefetch_blocks() -> int:
    """This machine's distance: DISTSERVE_AVX2_PREFETCH, the cached choice, or measured now
    (and cached; a cache that cannot be written only costs the measurement next time)."""
    explicit = os.environ.get("DISTSERVE_AVX2_PREFETCH")
    if explicit:
        try:
            blocks = int(explicit)
        except ValueError:
            blocks = -1
        if blocks < 0:
            raise ValueError(f"DISTSERVE_AVX2_PREFETCH={explicit!r}: give a number of blocks >= 0")
        return blocks
    path, key = cache_file(), machine_key()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    entry = table.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("avx2_prefetch_blocks"), int):
        return entry["avx2_prefetch_blocks"]
    seconds = measure()
    blocks = choose(seconds)
    log.info("AVX2 linear kernel: prefetching %d blocks ahead (64 MB at one row: %s)", blocks,
             ", ".join(f"{c} ahead {_WEIGHT_BYTES / s / 1e9:.1f} GB/s" for c, s in seconds.items()))
    table[key] = {"avx2_prefetch_blocks": blocks,
                  "GBps": {str(c): round(_WEIGHT_BYTES / s / 1e9, 2) for c, s in seconds.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(table, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        log.warning("could not keep the AVX2 prefetch choice in %s: %s", path, e)
    return blocks


def apply() -> int:
    """Set the kernel's distance for this process (once); returns it."""
    global _applied
    if _applied is None:
        _applied = prefetch_blocks()
        torch.ops.distserve_cpu.avx2_set_prefetch_blocks(_applied)
    return _applied
