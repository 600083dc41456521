"""Starting and stopping `distserve serve` as a child (its own session, so that stopping it
stops its instances too): for `distserve tune` and the benchmark scripts."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], port: int, log_path: pathlib.Path,
                 timeout_s: float = 300.0, env: dict | None = None) -> subprocess.Popen:
    """`distserve serve --port PORT FLAGS...` in its own session, once /health answers 200."""
    cmd = [sys.executable, "-m", "distserve.cli", "serve", "--port", str(port), *flags]
    return start_command(cmd, port, log_path, timeout_s, env)


def start_command(cmd: list[str], port: int, log_path: pathlib.Path, timeout_s: float = 300.0,
                  env: dict | None = None) -> subprocess.Popen:
    """Any server command (ours, or a peer such as vLLM's) in its own session, its output in
    `log_path`, once http://127.0.0.1:PORT/health answers 200; stopped again on a timeout."""
    import httpx
    with open(log_path, "w") as log:   # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    deadline = time.monotonic() + timeout_s
    try:   # stopped on any way out but health (a timeout, Ctrl-C): nothing left behind
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {' '.join(cmd)}\n{log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server did not become healthy in {timeout_s:.0f} s: {' '.join(cmd)}")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    """SIGINT to the server's whole process group (its instances too), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
