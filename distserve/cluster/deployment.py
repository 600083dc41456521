"""A deployment: which instances to start, with which settings and on which CPU cores.

Built from `serve` flags (and later from a plan file). Per-phase settings override the
shared engine settings; cores are handed out in order so phases never share a core when
there are enough of them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from distserve.cluster.launcher import InstanceSpec
from distserve.config import EngineConfig


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (empty where the OS does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@dataclass
class PhaseSettings:
    instances: int
    num_threads: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_memory_gib: float | None = None
    num_kv_blocks: int | None = None

    def apply(self, base: EngineConfig) -> EngineConfig:
        changes = {k: v for k, v in dataclasses.asdict(self).items()
                   if k != "instances" and v is not None}
        return dataclasses.replace(base, **changes)


@dataclass
class Deployment:
    base: EngineConfig
    mode: str                                 # disaggregated | colocated
    prefill: PhaseSettings | None = None
    decode: PhaseSettings | None = None
    colocated: PhaseSettings | None = None
    transfer: str = "shm"
    pin_cpus: bool = True
    specs: list[InstanceSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"unknown mode {self.mode!r}; choose disaggregated or colocated")
        if self.transfer not in ("shm", "tcp"):
            raise ValueError(f"unknown KV transfer backend {self.transfer!r}; choose shm or tcp")
        phases = ([("prefill", self.prefill), ("decode", self.decode)]
                  if self.mode == "disaggregated" else [("colocated", self.colocated)])
        for role, phase in phases:
            if phase is None or phase.instances < 1:
                raise ValueError(f"a {self.mode} deployment needs at least one {role} instance")
        cores = usable_cores()
        next_core = 0
        for role, phase in phases:
            config = phase.apply(self.base)
            threads = config.num_threads or 1
            config = dataclasses.replace(config, num_threads=threads)
            for i in range(phase.instances):
                cpus: list[int] = []
                if self.pin_cpus and next_core + threads <= len(cores):
                    cpus = cores[next_core:next_core + threads]
                    next_core += threads
                self.specs.append(InstanceSpec(role, f"{role}-{i}", config, cpus))

    @property
    def num_instances(self) -> int:
        return len(self.specs)
