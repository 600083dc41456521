"""Starts instance processes on this machine (the default launcher).

Each instance is a fresh interpreter (`python -m distserve.cluster.instance`), optionally
pinned to given CPU cores, so phases never share a thread pool.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

from distserve.cluster.deployment import visible_device_ids, visible_gpus
from distserve.cluster.launcher import InstanceSpec
from distserve.cluster.messages import SECRET_ENV


class LocalLauncher:
    """Instances as local processes; a TP x PP instance starts its other workers itself,
    on its share of the cores."""

    def start(self, spec: InstanceSpec, controller: str, transfer: str,
              secret: bytes) -> LocalProcess:
        return LocalProcess(spec, controller, transfer, secret)


class LocalProcess:
    def __init__(self, spec: InstanceSpec, controller: str, transfer: str,
                 secret: bytes) -> None:
        self.spec = spec
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env[SECRET_ENV] = secret.hex()  # the environment, unlike argv, is not world-readable
        if spec.config.num_threads:
            env["OMP_NUM_THREADS"] = str(spec.config.num_threads)
        on_gpus = spec.devices and (spec.config.device or "cuda").startswith("cuda") and visible_gpus()
        if on_gpus:   # its devices are CUDA devices: worker r takes the r-th of them
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_device_ids(spec.devices))
        cmd = [sys.executable, "-m", "distserve.cluster.instance", "--role", spec.role,
               "--instance-id", spec.instance_id, "--controller", controller,
               "--config-json", json.dumps(asdict(spec.config)), "--transfer", transfer,
               "--host", spec.host, *(["--switchable"] if spec.switchable else [])]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        if spec.devices and not on_gpus:
            try:
                os.sched_setaffinity(self.proc.pid, spec.devices)
            except OSError:
                pass  # fewer cores than asked for: run unpinned

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, chars: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
