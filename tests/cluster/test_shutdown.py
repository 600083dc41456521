"""SIGTERM on a real `distserve serve` with instance processes, mid-stream (and after one of
its instances was killed): it drains, exits, and leaves no process and no shared-memory
segment behind."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from helpers.serve_process import free_port, start_serve

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def _stream(url: str, events: list) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            if r.status_code != 200:   # refused before any event (e.g. an instance is down)
                events.append(f"status {r.status_code}: {r.read().decode()}")
                return
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as e:   # the server closed the connection at the end of the drain
        events.append(f"closed: {type(e).__name__}")


@pytest.mark.parametrize("kill_first", [None, "decode"])
def test_sigterm_drains_and_leaves_nothing_behind(tiny_llama, kill_first):
    port = free_port()
    before = _segments()
    proc = start_serve([str(tiny_llama), "--served-model-name", "tiny", "--dtype", "float32",
                        "--num-kv-blocks", "64", "--prefill-instances", "1", "--decode-instances",
                        "1", "--no-pin-cpus", "--drain-timeout", "3"], port)
    url = f"http://127.0.0.1:{port}"
    try:
        instances = _children(proc.pid)
        assert len(instances) == 2 and _segments() - before
        if kill_first:
            victim = next(p for p in instances
                          if f"{kill_first}-0" in open(f"/proc/{p}/cmdline").read())
            os.kill(victim, signal.SIGKILL)
        events: list = []
        client = threading.Thread(target=_stream, args=(url, events))
        client.start()
        while not events and client.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        client.join(30)
        assert not client.is_alive()
        output = proc.stdout.read().decode()
        assert "drained and shut down" in output, output
        for pid in instances:   # no orphan: each instance process is gone
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
        assert not (_segments() - before)
        last = events[-1]
        if last.startswith("status "):
            # the request came after the controller had seen its decode instance die (it checks
            # every 0.25 s): refused whole, in the OpenAI error shape
            assert kill_first and last.startswith("status 503") and '"error"' in last, last
        elif last not in ("[DONE]",) and not last.startswith("closed"):
            assert "error" in json.loads(last)   # the stream ends in an error event, not silence
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
