"""The plan: what to deploy (per-phase TP/PP and instance counts, placement on nodes), what
it is predicted to do (goodput per GPU, its spread over seeds), the colocated alternative
and the verdict, and the candidates the search considered. A small YAML/JSON document that
`distserve serve --plan` deploys (distserve.cluster.deployment.Deployment.from_plan).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class PhasePlan:
    tp: int
    pp: int
    instances: int
    max_num_batched_tokens: int | None = None   # prefill: prompt tokens per batch (None: KV room)
    max_num_seqs: int | None = None         # decode: requests per batch

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.instances


def verdict_mode(verdict: str) -> str:
    """The mode a verdict says to deploy (disaggregated unless it says stay colocated)."""
    return "colocated" if verdict.startswith("stay colocated") else "disaggregated"


@dataclass
class Plan:
    model: str
    hardware: str
    nodes: int
    gpus_per_node: int
    workload: str
    ttft_slo: float
    tpot_slo: float
    attainment_target: float
    algorithm: str                      # whole | high | low (node affinity)
    prefill: PhasePlan
    decode: PhasePlan
    goodput: float                      # req/s of the whole deployment (mean over seeds)
    goodput_per_gpu: float
    goodput_spread: float = 0.0         # standard deviation over seeds, req/s per GPU
    placement: list = field(default_factory=list)
    colocated: dict | None = None       # best colocated alternative on the same cluster
    verdict: str = ""
    candidates: list = field(default_factory=list)
    latency_source: dict = field(default_factory=dict)
    search_seconds: float = 0.0
    simulations: int = 0                # whole deployments simulated by the search
    mode: str = "disaggregated"         # what the verdict says to deploy: disaggregated |
    #                                     colocated (then `colocated` says TP, PP, instances)

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"plan mode must be disaggregated or colocated, got {self.mode!r}")
        if self.mode == "colocated" and not self.colocated:
            raise ValueError("a colocated plan needs its 'colocated' deployment (tp, pp)")

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus + self.decode.num_gpus

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_gpus"] = self.num_gpus
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d.pop("num_gpus", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown plan fields: {', '.join(sorted(unknown))}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"plan lacks: {', '.join(missing)}")
        for phase in ("prefill", "decode"):
            if not isinstance(d[phase], dict):
                raise ValueError(f"plan field {phase!r} must be a mapping with tp, pp, instances")
            phase_plan = dict(d[phase])
            if "max_batched_tokens" in phase_plan:   # the name plans written before 2026-12 use
                phase_plan["max_num_batched_tokens"] = phase_plan.pop("max_batched_tokens")
            try:
                d[phase] = PhasePlan(**phase_plan)
            except TypeError as e:
                raise ValueError(f"plan field {phase!r}: {e}") from None
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str) -> None:
        text = self.to_json() if path.endswith(".json") else self.to_yaml()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load(cls, path: str) -> "Plan":
        import yaml   # YAML is a superset of JSON: one loader for both
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a plan (expected a mapping)")
        return cls.from_dict(data)


def place(nodes: int, gpus_per_node: int, prefill: PhasePlan, decode: PhasePlan,
          segments: int = 1, paired: bool = False) -> list[dict]:
    """GPUs of every pipeline stage of every instance: [{instance, stage, node, gpus}].

    paired (low node-affinity): prefill instance u and decode instance u are cut into
    `segments` segments of consecutive stages, and segment s of both sits on one node.
    Otherwise each stage goes to the first node with room (a TP group never spans nodes).
    Raises ValueError when the cluster is too small."""
    free = [list(range(gpus_per_node)) for _ in range(nodes)]
    out: list[dict] = []

    def node_with(count: int, prefer: int = 0) -> int:
        for i in [prefer % nodes] + list(range(nodes)):
            if len(free[i]) >= count:
                return i
        raise ValueError(f"the cluster ({nodes} x {gpus_per_node} GPUs) cannot hold the plan")

    def take(node: int, count: int, name: str, stage: int) -> None:
        out.append({"instance": name, "stage": stage, "node": node, "gpus": free[node][:count]})
        del free[node][:count]

    if paired:
        per_p, per_d = prefill.pp // segments, decode.pp // segments
        for u in range(prefill.instances):
            for s in range(segments):
                node = node_with(prefill.tp * per_p + decode.tp * per_d, u * segments + s)
                for k in range(per_p):
                    take(node, prefill.tp, f"prefill-{u}", s * per_p + k)
                for k in range(per_d):
                    take(node, decode.tp, f"decode-{u}", s * per_d + k)
        return out
    for role, ph in (("prefill", prefill), ("decode", decode)):
        for u in range(ph.instances):
            for s in range(ph.pp):
                take(node_with(ph.tp), ph.tp, f"{role}-{u}", s)
    return out


def same_node(placement: list[dict]) -> bool:
    """True when every instance of the placement sits on one node."""
    return len({p["node"] for p in placement}) <= 1
