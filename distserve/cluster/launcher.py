"""The launcher seam: what the controller knows of how instances are started.

An instance spec says what to start and where (node, host, devices, TP and PP); a launcher
starts it and hands back a handle the controller can ask whether it is alive, stop, and read
the log tail of. The local-process launcher (local.py) is the default; one for other machines
(Ray) implements the same protocol. Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from distserve.config import EngineConfig


@dataclass
class InstanceSpec:
    role: str                      # prefill | decode | colocated
    instance_id: str
    config: EngineConfig
    devices: list[int] = field(default_factory=list)  # CPU cores to pin to (empty: any), or
    #                                                   CUDA device ids on a GPU node
    node: int | None = None        # the plan's node index (None: wherever the launcher
    #                                placing it finds room; the local launcher: this machine)
    host: str = "127.0.0.1"        # the address its sockets bind to on that machine
    switchable: bool = False       # can switch between prefill and decode in place (--adapt)

    @property
    def tp(self) -> int:
        """Tensor-parallel workers (the engine config's, which the instance runs)."""
        return self.config.tensor_parallel_size

    @property
    def pp(self) -> int:
        """Pipeline stages."""
        return self.config.pipeline_parallel_size


class InstanceHandle(Protocol):
    @property
    def alive(self) -> bool: ...

    def output_tail(self, chars: int = 2000) -> str: ...

    def stop(self, timeout: float = 10.0) -> None: ...


class Launcher(Protocol):
    def start(self, spec: InstanceSpec, controller: str, transfer: str,
              secret: bytes) -> InstanceHandle:
        """Starts `spec`'s instance, which connects to the controller's inbox at
        `controller` (tcp://host:port), pulls KV over `transfer`, and signs and checks every
        message and KV connection with the deployment's `secret` (never on a command line)."""
        ...
