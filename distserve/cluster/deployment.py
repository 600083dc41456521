"""A deployment: which instances to start, with which settings and on which CPU cores.

Built in one place, from `serve` flags (`from_flags`) or from a plan file (`from_plan`).
Per-phase settings override the shared engine settings; cores are handed out in order so
phases never share a core when there are enough of them. What a plan asks for and this
machine cannot run is listed in `warnings`, by name, never dropped silently.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from distserve.cluster.launcher import InstanceSpec
from distserve.config import EngineConfig


# the KV transfer backends (distserve.transfer.base.BACKENDS, named here without torch)
TRANSFER_BACKENDS = ("shm", "tcp", "cuda_ipc")
DEFAULT_KV_GIB = 2.0      # per instance, where the machine has the memory for it
KV_SHARE_OF_MEMORY = 0.5  # of the memory available at start, for all instances' KV together


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def default_kv_budget_gib(num_instances: int, available: int | None) -> float:
    """Each instance's KV budget when none is given: DEFAULT_KV_GIB, or less so that all of
    them together take at most KV_SHARE_OF_MEMORY of what is available (the weights, the
    activations and the rest of the machine need the other part)."""
    if available is None:
        return DEFAULT_KV_GIB
    fair = KV_SHARE_OF_MEMORY * available / 2 ** 30 / max(num_instances, 1)
    return max(min(DEFAULT_KV_GIB, round(fair, 2)), 0.05)


def kv_in_use_gib(max_num_seqs: int, max_model_len: int, block_size: int,
                  kv_bytes_per_token: int) -> float:
    """The most KV an instance that runs at most max_num_seqs requests of up to max_model_len
    tokens can hold in use: their whole blocks plus the block of slack per request that the
    decode admission keeps, rounded up to 0.01 GiB so that it always holds them (never less
    than one full-length request). More KV than this is never used, only allocated."""
    blocks = max_num_seqs * (math.ceil(max_model_len / block_size) + 1)
    return math.ceil(blocks * block_size * kv_bytes_per_token * 100 / 2 ** 30) / 100


def instance_device(config: EngineConfig) -> str:
    """The device an instance of this config runs on (the engine's default, without torch)."""
    return config.device or ("cuda" if visible_gpus() else "cpu")


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (empty where the OS does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def visible_gpus() -> list[int]:
    """The CUDA devices instances may use, without importing torch: $CUDA_VISIBLE_DEVICES
    (as indices into it) or the /dev/nvidiaN device files."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return list(range(len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])))
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return sorted(int(n[6:]) for n in names if n.startswith("nvidia") and n[6:].isdigit())


def visible_device_ids(index: list[int]) -> list[str]:
    """$CUDA_VISIBLE_DEVICES entries at these indices (the ids themselves where it is unset)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env is not None else None
    return [ids[i] if ids else str(i) for i in index]


@dataclass
class PhaseSettings:
    instances: int
    num_threads: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_memory_gib: float | None = None
    num_kv_blocks: int | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None

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
    ttft_slo: float | None = None      # a plan's SLOs: the server's defaults
    tpot_slo: float | None = None
    warnings: list[str] = field(default_factory=list)
    specs: list[InstanceSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"unknown mode {self.mode!r}; choose disaggregated or colocated")
        if self.transfer not in TRANSFER_BACKENDS:
            raise ValueError(f"unknown KV transfer backend {self.transfer!r}; choose one of "
                             f"{', '.join(TRANSFER_BACKENDS)}")
        if (self.transfer == "cuda_ipc" and self.mode == "disaggregated"
                and not (self.base.device or "cuda").startswith("cuda")):
            raise ValueError(f"--transfer cuda_ipc moves KV between CUDA devices; the instances "
                             f"run on device {self.base.device!r}: use --transfer shm or tcp")
        phases = ([("prefill", self.prefill), ("decode", self.decode)]
                  if self.mode == "disaggregated" else [("colocated", self.colocated)])
        for role, phase in phases:
            if phase is None or phase.instances < 1:
                raise ValueError(f"a {self.mode} deployment needs at least one {role} instance")
        gpus = visible_gpus() if (self.base.device or "cuda").startswith("cuda") else []
        cores = gpus or usable_cores()   # on a GPU node the devices dealt out are GPUs
        next_core = 0
        for role, phase in phases:
            config = phase.apply(self.base)
            threads = config.num_threads or 1   # per worker
            config = dataclasses.replace(config, num_threads=threads)
            need = config.num_workers * (1 if gpus else threads)
            for i in range(phase.instances):
                devices: list[int] = []
                if (self.pin_cpus or gpus) and next_core + need <= len(cores):
                    devices = cores[next_core:next_core + need]
                    next_core += need
                elif gpus:
                    raise ValueError(f"the deployment needs more than the {len(gpus)} visible "
                                     f"CUDA devices ({role}-{i} needs {need} more)")
                self.specs.append(InstanceSpec(role, f"{role}-{i}", config, devices))

    @property
    def num_instances(self) -> int:
        return len(self.specs)

    def make_switchable(self) -> list[str]:
        """Starts every one-worker prefill and decode instance switchable (serve --adapt: it
        keeps an exported KV cache and a puller, to change roles in place); returns the ids
        of those that cannot be (several workers each)."""
        if self.mode != "disaggregated":
            raise ValueError("--adapt moves instances between prefill and decode: it needs a "
                             "disaggregated deployment")
        fixed = []
        for spec in self.specs:
            if spec.config.num_workers == 1:
                spec.switchable = True
            else:
                fixed.append(spec.instance_id)
        return fixed

    @classmethod
    def from_flags(cls, base: EngineConfig, mode: str | None = None, instances: int | None = None,
                   prefill_instances: int = 0, decode_instances: int = 0,
                   prefill_threads: int | None = None, decode_threads: int | None = None,
                   prefill_max_num_batched_tokens: int | None = None,
                   decode_max_num_seqs: int | None = None,
                   prefill_kv_cache_memory: float | None = None,
                   decode_kv_cache_memory: float | None = None,
                   transfer: str = "shm", pin_cpus: bool = True,
                   prefill_tp: int | None = None, prefill_pp: int | None = None,
                   decode_tp: int | None = None,
                   decode_pp: int | None = None) -> Deployment | None:
        """What `serve`'s flags describe; None for one engine inside the server's process."""
        mode = mode or ("disaggregated" if prefill_instances or decode_instances else "colocated")
        if mode == "colocated":
            if prefill_instances or decode_instances:
                raise ValueError("--prefill-instances/--decode-instances need --mode disaggregated")
            instances = 1 if instances is None else instances
            if instances < 0:
                raise ValueError(f"--instances must be >= 0, got {instances}")
            if instances == 0:
                return None
            if any(v is not None for v in (prefill_tp, prefill_pp, decode_tp, decode_pp)):
                raise ValueError("--prefill-tp/--prefill-pp/--decode-tp/--decode-pp need a "
                                 "disaggregated deployment; colocated instances take --tp/--pp")
            cores = len(usable_cores()) or os.cpu_count() or 1
            threads = base.num_threads or max(1, cores // (instances * base.num_workers))
            return cls(base, "colocated", colocated=PhaseSettings(instances, threads),
                       pin_cpus=pin_cpus)
        if prefill_instances < 1 or decode_instances < 1:
            raise ValueError("a disaggregated deployment needs --prefill-instances >= 1 and "
                             f"--decode-instances >= 1, got {prefill_instances} and "
                             f"{decode_instances}")
        prefill = PhaseSettings(prefill_instances, prefill_threads,
                                max_num_batched_tokens=prefill_max_num_batched_tokens,
                                kv_cache_memory_gib=prefill_kv_cache_memory,
                                tensor_parallel_size=prefill_tp, pipeline_parallel_size=prefill_pp)
        decode = PhaseSettings(decode_instances, decode_threads, max_num_seqs=decode_max_num_seqs,
                               kv_cache_memory_gib=decode_kv_cache_memory,
                               tensor_parallel_size=decode_tp, pipeline_parallel_size=decode_pp)
        return cls(base, "disaggregated", prefill=prefill, decode=decode, transfer=transfer,
                   pin_cpus=pin_cpus)

    @classmethod
    def from_plan(cls, plan, base: EngineConfig, transfer: str = "shm",
                  pin_cpus: bool = True, launcher: str = "local") -> Deployment:
        """The deployment a plan (distserve.planner.plan.Plan) describes: the mode its verdict
        chose, its instance counts, TP and PP, batching limits, SLOs and each instance's node
        (spec.node, which the Ray launcher honours). What cannot be honoured here is named in
        `warnings`."""
        warnings = []
        node_of: dict[str, int] = {}
        spread: list[str] = []
        for stage in plan.placement:   # an instance runs on one node: its first stage's
            name = stage["instance"]
            node_of.setdefault(name, stage["node"])
            if stage["node"] != node_of[name] and name not in spread:
                spread.append(name)
                warnings.append(f"the plan spreads {name}'s pipeline stages over nodes; all "
                                f"of them run on node {node_of[name]}")
        if launcher == "local" and (plan.nodes > 1 or len(set(node_of.values())) > 1):
            warnings.append(f"the plan places instances on {plan.nodes} nodes; all are "
                            "deployed on this machine (--launcher ray deploys them on a Ray "
                            "cluster)")
        if plan.hardware != "cpu" and (base.device or "cpu").startswith("cpu"):
            warnings.append(f"the plan was made for {plan.hardware}; this deployment runs on "
                            "CPU, so its predicted goodput does not apply here")
        if plan.mode == "colocated":   # the verdict: colocated replicas beat disaggregation
            c = plan.colocated
            per = c["tp"] * c["pp"]
            count = c.get("instances") or max(1, plan.nodes * plan.gpus_per_node // per)
            if plan.nodes > 1 and launcher == "local":
                warnings[:] = [w for w in warnings if "places instances on" not in w]
                warnings.append(f"the plan's {count} colocated instances span {plan.nodes} "
                                "nodes; all are deployed on this machine")
            return cls(base, "colocated",
                       colocated=PhaseSettings(count, tensor_parallel_size=c["tp"],
                                               pipeline_parallel_size=c["pp"]),
                       transfer=transfer, pin_cpus=pin_cpus and launcher == "local",
                       ttft_slo=plan.ttft_slo, tpot_slo=plan.tpot_slo, warnings=warnings)
        deployment = cls(
            base, "disaggregated",
            prefill=PhaseSettings(plan.prefill.instances,
                                  max_num_batched_tokens=plan.prefill.max_num_batched_tokens,
                                  tensor_parallel_size=plan.prefill.tp,
                                  pipeline_parallel_size=plan.prefill.pp),
            decode=PhaseSettings(plan.decode.instances, max_num_seqs=plan.decode.max_num_seqs,
                                 tensor_parallel_size=plan.decode.tp,
                                 pipeline_parallel_size=plan.decode.pp),
            transfer=transfer, pin_cpus=pin_cpus and launcher == "local",
            ttft_slo=plan.ttft_slo, tpot_slo=plan.tpot_slo, warnings=warnings)
        for spec in deployment.specs:
            spec.node = node_of.get(spec.instance_id)
        return deployment

    @property
    def nodes(self) -> set[int]:
        """The plan nodes the instances are placed on (empty: no placement)."""
        return {s.node for s in self.specs if s.node is not None}
