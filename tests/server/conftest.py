"""A real server on 127.0.0.1: uvicorn in a thread of this process, over the tiny Llama.

In-process so that tests can look at the engine's block allocator after the HTTP traffic.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn

from distserve.config import EngineConfig
from distserve.engine.async_engine import AsyncEngine
from distserve.engine.engine import Engine
from distserve.server.app import build_app

MODEL = "tiny"


@dataclass
class Served:
    url: str
    client: AsyncEngine
    app: object

    @property
    def allocator(self):
        return self.client.engine.kv.allocator

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits (bounded) until no request is left and every KV block is back, then checks."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.client.stats()
            if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine did not drain in {timeout}s: {s}")
            time.sleep(0.02)
        assert self.allocator.num_free == self.allocator.num_blocks
        self.allocator.check()
        assert not self.client.engine.requests


def _serve(model_dir, num_kv_blocks: int, api_key: str | None = None,
           engine: dict | None = None, **app_kwargs):
    """`engine`: EngineConfig settings other than this file's float32 on one thread."""
    client = AsyncEngine(Engine(EngineConfig(**{
        "model": str(model_dir), "dtype": "float32", "num_kv_blocks": num_kv_blocks,
        "num_threads": 1, **(engine or {})})))
    app = build_app(client, MODEL, api_key, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Served(f"http://127.0.0.1:{port}", client, app), server, thread


def _serving(model_dir, num_kv_blocks: int, **kwargs):
    """A fixture's body: the server for the session, stopped at its end."""
    s, server, thread = _serve(model_dir, num_kv_blocks, **kwargs)
    yield s
    server.should_exit = True
    thread.join(10)
    s.client.shutdown()


@pytest.fixture(scope="session")
def served(tiny_llama):
    yield from _serving(tiny_llama, num_kv_blocks=128)


@pytest.fixture(scope="session")
def keyed(tiny_llama):
    """A second server that wants an API key (its own small engine: one loop per engine)."""
    yield from _serving(tiny_llama, num_kv_blocks=16, api_key="sesame")


@pytest.fixture
def oai(served):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0,
                       timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def bounded(tiny_llama):
    """A server that lets at most 2 requests wait for their first token."""
    yield from _serving(tiny_llama, num_kv_blocks=64, max_queued_requests=2)


@pytest.fixture(scope="session")
def late(tiny_llama):
    """A server with --reject-late and a TTFT SLO no prompt can meet (1 microsecond)."""
    from distserve.server.slo import SLOWindow
    yield from _serving(tiny_llama, num_kv_blocks=64, slo=SLOWindow(1e-6, 1.0), reject_late=True)
