"""Fixtures for the bench tests: the default tokenizer (loaded once), and a tiny loopback
HTTP server that stands in for an OpenAI-compatible server: it streams a known number of SSE
chunks with known sleeps, or misbehaves on purpose (HTTP 500, malformed SSE, a stream cut
short) for the fault cases a real server does not produce."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distserve.bench.workload import load_tokenizer

FIRST_DELAY = 0.05  # seconds before the first chunk
GAP = 0.01          # seconds between chunks


@pytest.fixture(scope="session")
def bench_tokenizer():
    return load_tokenizer(None)


class FakeHandler(BaseHTTPRequestHandler):
    """Behaviour chosen by the server's `mode`: ok, error500, flaky (every other request
    fails), malformed, truncated, not_sse, serial (one request at a time, like a queue)."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        if self.path != "/v1/models":
            return self._json(404, {"error": {"message": "no such route", "type": "not_found", "code": 404}})
        entry = {"id": "fake-model", "object": "model"}
        if self.server.num_gpus:
            entry["num_gpus"] = self.server.num_gpus
        self._json(200, {"object": "list", "data": [entry]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        server = self.server
        with server.lock:
            server.bodies.append(body)
            count = len(server.bodies)
        mode = server.mode
        if mode == "error500" or (mode == "flaky" and count % 2 == 0):
            return self._json(500, {"error": {"message": "engine exploded", "type": "server_error", "code": 500}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "not_sse":
            self.wfile.write(b"hello, not an event stream\n")
            return
        guard = server.serial_lock if mode == "serial" else contextlib.nullcontext()
        with guard:
            self._stream(body, mode)

    def _stream(self, body: dict, mode: str):
        n = int(body.get("max_tokens", 4))
        time.sleep(FIRST_DELAY)
        for i in range(n):
            if i:
                time.sleep(GAP)
            if mode == "malformed" and i == 1:
                self._send("data: {this is not json")
                return
            if mode == "truncated" and i == 2:
                return
            finish = "length" if i == n - 1 else None
            if self.path == "/v1/chat/completions":
                if i == 0:  # the opening role-only delta carries no token
                    self._send("data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
                chunk = {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": " tok"}, "finish_reason": finish}]}
            else:
                chunk = {"object": "text_completion", "choices": [
                    {"index": 0, "text": " tok", "finish_reason": finish}]}
            self._send("data: " + json.dumps(chunk))
        self._send("data: " + json.dumps({"object": "text_completion", "choices": [],
                                          "usage": {"prompt_tokens": 3, "completion_tokens": n,
                                                    "total_tokens": n + 3}}))
        self._send("data: [DONE]")

    def _send(self, line: str):
        self.wfile.write(line.encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def fake_server(mode: str = "ok", num_gpus: int | None = None):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
    server.daemon_threads = True
    server.mode, server.num_gpus = mode, num_gpus
    server.lock, server.serial_lock = threading.Lock(), threading.Lock()
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def serve_fake():
    """serve_fake(mode, num_gpus=None) -> (server, base_url), shut down after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda mode="ok", num_gpus=None: stack.enter_context(fake_server(mode, num_gpus))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
