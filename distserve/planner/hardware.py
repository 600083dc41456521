"""Accelerators and clusters the planner knows, as plain data tables.

Peaks are the vendors' dense (no sparsity) fp16/bf16 tensor figures; bandwidths are bytes per
second in one direction; each entry says where its numbers come from. `generation` groups the
accelerators whose roofline efficiency factors are shared (fitted on measured steps of one of
them: planner/measured.py). Pure data: nothing here measures or imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2 ** 30


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float            # peak dense fp16/bf16 FLOP/s
    mem_bandwidth: float    # HBM bytes/s
    memory: float           # bytes (the marketed "80GB" is 80 GiB)
    link_bandwidth: float   # GPU-to-GPU inside a node, bytes/s per direction
    generation: str = ""    # ampere | hopper | ada | cpu: shares roofline efficiency factors
    source: str = ""        # where the numbers come from


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-80g", 312e12, 2039 * GB, 80 * GIB, 300 * GB, "ampere",
             "NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, "
             "NVLink 3 600 GB/s both ways"),
    Hardware("h100-80g", 989e12, 3350 * GB, 80 * GIB, 450 * GB, "hopper",
             "NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 4 "
             "900 GB/s both ways"),
    Hardware("h200", 989e12, 4800 * GB, 140 * GIB, 450 * GB, "hopper",
             "NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e, 141 GB, "
             "NVLink 4 900 GB/s both ways"),
    Hardware("l40s", 362e12, 864 * GB, 48 * GIB, 32 * GB, "ada",
             "NVIDIA L40S datasheet: 362 TFLOP/s bf16 dense, 864 GB/s GDDR6, PCIe 4.0 x16, "
             "no NVLink"),
    # A host CPU running our engine: nominal figures, only for memory sizing; its latency
    # comes from a profile measured with `distserve profile`.
    Hardware("cpu", 1e12, 50 * GB, 16 * GIB, 10 * GB, "cpu",
             "nominal (memory sizing only): latency comes from a `distserve profile`"),
)}

_ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "a100-sxm": "a100-80g",
            "h100": "h100-80g", "h100-80gb": "h100-80g", "h100-sxm": "h100-80g",
            "h200-141g": "h200", "h200-141gb": "h200"}


def get_hardware(name: str) -> Hardware:
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known hardware: {', '.join(HARDWARE)}")
    return HARDWARE[key]


@dataclass(frozen=True)
class Cluster:
    hardware: Hardware
    nodes: int = 1
    gpus_per_node: int = 8
    cross_node_bandwidth: float = 25e9 / 8   # bytes/s; the paper's testbed: 25 Gbps Ethernet

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"a cluster needs nodes >= 1 and gpus_per_node >= 1, got "
                             f"{self.nodes} and {self.gpus_per_node}")
        if self.cross_node_bandwidth <= 0:
            raise ValueError(f"cross_node_bandwidth must be > 0, got {self.cross_node_bandwidth}")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, same_node: bool) -> float:
        """Bytes/s between two instances: NVLink (or PCIe) inside a node, the network across."""
        return self.hardware.link_bandwidth if same_node else self.cross_node_bandwidth


# Named clusters: the paper's testbed and a common single-node shape per accelerator.
CLUSTERS: dict[str, Cluster] = {
    "paper-a100": Cluster(HARDWARE["a100-80g"], nodes=4, gpus_per_node=8),
    "a100x8": Cluster(HARDWARE["a100-80g"], nodes=1, gpus_per_node=8),
    "h100x8": Cluster(HARDWARE["h100-80g"], nodes=1, gpus_per_node=8, cross_node_bandwidth=50e9),
    "h200x8": Cluster(HARDWARE["h200"], nodes=1, gpus_per_node=8, cross_node_bandwidth=50e9),
    "l40sx4": Cluster(HARDWARE["l40s"], nodes=1, gpus_per_node=4),
}


def get_cluster(name: str) -> Cluster:
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}; known clusters: {', '.join(CLUSTERS)}")
    return CLUSTERS[name]
