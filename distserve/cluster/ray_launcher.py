"""Starts instances on the nodes of a Ray cluster (`serve --launcher ray`).

Each instance is a Ray actor that runs the same instance process the local launcher runs
(`python -m distserve.cluster.instance`, its TP x PP workers beside it) on the actor's node,
and answers whether it is alive, its log tail, and stop. The actors are placed with placement
groups: one per node of the plan, STRICT_PACK, pinned to one Ray node by its node-id label, so
the instances a plan puts on one node (the prefill and decode segments of one stage, for the
low node-affinity plan) share that node and its fast link. Plan node i is the i-th alive Ray
node, the head first. Instances without a planned node go wherever Ray finds their cores.

The instance binds its sockets to its node's address, and the controller to the driver's, so
every node must reach the others (every message and KV connection is signed with the
deployment's secret, which travels to the actors through Ray, never on a command line); the model path must exist on every node. Ray is optional
(`pip install -e ".[ray]"`). Imports no torch.
"""
from __future__ import annotations

import dataclasses
import logging

from distserve.cluster.launcher import InstanceSpec
from distserve.cluster.local import LocalProcess

log = logging.getLogger(__name__)
_NODE_LABEL = "ray.io/node-id"
_CALL_TIMEOUT_S = 30.0
_PLACEMENT_TIMEOUT_S = 120.0


def import_ray():
    """ray, or a clear message of how to get it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--launcher ray needs Ray: pip install -e \".[ray]\" (or "
                           "pip install ray) on every node") from None
    return ray


def cluster_nodes(ray) -> list[str]:
    """The alive Ray nodes that have CPUs, head first, then by address and id: plan node i
    is the i-th of them."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    nodes.sort(key=lambda n: ("node:__internal_head__" not in n["Resources"],
                              n["NodeManagerAddress"], n["NodeID"]))
    return [n["NodeID"] for n in nodes]


def bundle(spec: InstanceSpec) -> dict[str, float]:
    """What one instance reserves: a core per worker thread on CPU, a GPU per worker on CUDA."""
    workers = spec.tp * spec.pp
    if (spec.config.device or "cpu").startswith("cuda"):
        return {"CPU": 1.0, "GPU": float(workers)}
    return {"CPU": float((spec.config.num_threads or 1) * workers)}


class InstanceActor:
    """Runs one instance process on its Ray node and reports on it."""

    def __init__(self, spec: InstanceSpec, controller: str, transfer: str,
                 secret: bytes, host: str | None) -> None:
        import ray
        # its sockets bind to this node's address, which the others reach; cores are the
        # bundle's (Ray does not pin them), CUDA devices the ones Ray made visible
        spec = dataclasses.replace(spec, host=host or ray.util.get_node_ip_address(),
                                   devices=[])
        self.process = LocalProcess(spec, controller, transfer, secret)

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def alive(self) -> bool:
        return self.process.alive

    def output_tail(self, chars: int) -> str:
        return self.process.output_tail(chars)

    def stop(self, timeout: float) -> None:
        self.process.stop(timeout)


class RayInstance:
    """The controller's handle on an instance actor (an InstanceHandle)."""

    def __init__(self, ray, actor) -> None:
        self._ray = ray
        self.actor = actor
        self._tail = ""

    def _call(self, method: str, *args, timeout: float = _CALL_TIMEOUT_S):
        return self._ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)

    @property
    def node_id(self) -> str:
        return self._call("node_id")

    @property
    def alive(self) -> bool:
        try:
            return self._call("alive")
        except Exception:   # the actor or its node is gone, or does not answer
            return False

    def output_tail(self, chars: int = 2000) -> str:
        try:
            self._tail = self._call("output_tail", chars)
        except Exception as e:
            return f"{self._tail}\n(the instance's actor is gone: {type(e).__name__}: {e})"
        return self._tail

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self._call("stop", timeout, timeout=timeout + _CALL_TIMEOUT_S)
        except Exception as e:
            log.warning("stopping an instance actor: %s", e)
        self._ray.kill(self.actor)


class RayLauncher:
    """Instances as Ray actors on the nodes the deployment's specs name (spec.node).

    host: the address every instance binds to; None (the default) is its node's address.
    A cluster whose nodes are all this machine (ray.cluster_utils) can keep it on loopback."""

    def __init__(self, specs: list[InstanceSpec], address: str | None = None,
                 host: str | None = None) -> None:
        ray = self.ray = import_ray()
        self.host = host
        from ray.util.placement_group import placement_group
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        nodes = cluster_nodes(ray)
        wanted = sorted({s.node for s in specs if s.node is not None})
        if wanted and wanted[-1] >= len(nodes):
            raise ValueError(f"the deployment places instances on {wanted[-1] + 1} nodes; the "
                             f"Ray cluster has {len(nodes)} with CPUs")
        self.groups = []
        self.bundle_of: dict[str, tuple] = {}    # instance id -> (placement group, index)
        for node in [*wanted, None]:
            members = [s for s in specs if s.node == node]
            if not members:
                continue
            selector = ([{_NODE_LABEL: nodes[node]}] * len(members) if node is not None
                        else None)
            group = placement_group([bundle(s) for s in members],
                                    strategy="STRICT_PACK" if node is not None else "PACK",
                                    bundle_label_selector=selector)
            self.groups.append(group)
            for i, s in enumerate(members):
                self.bundle_of[s.instance_id] = (group, i)
        try:
            ray.get([g.ready() for g in self.groups], timeout=_PLACEMENT_TIMEOUT_S)
        except Exception as e:
            self.close()
            raise RuntimeError(f"the Ray cluster cannot place the deployment ({e}); "
                               f"`ray status` shows what it has") from None

    def start(self, spec: InstanceSpec, controller: str, transfer: str,
              secret: bytes) -> RayInstance:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        group, index = self.bundle_of[spec.instance_id]
        need = bundle(spec)
        actor = self.ray.remote(InstanceActor).options(
            num_cpus=need["CPU"], num_gpus=need.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=index),
        ).remote(spec, controller, transfer, secret, self.host)
        return RayInstance(self.ray, actor)

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group
        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception as e:
                log.warning("removing a placement group: %s", e)
        self.groups = []
