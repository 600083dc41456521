"""The scripts in examples/ run as a user runs them (a child process each), on the tests'
tiny random-weight model: offline batch generation, a streaming chat client against a real
server, and plan -> serve -> bench on this machine."""
from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import httpx
import pytest

from helpers.serve_process import free_port, start_serve
from helpers.tiny_models import build_tiny_model

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_offline_batch(tiny_llama):
    out = _run("offline_batch.py", str(tiny_llama), timeout=300).stdout
    answers = re.findall(r"\((\d+) tokens, finished by (\w+)\)", out)
    assert out.count("### ") == len(answers) == 4
    assert all(1 <= int(n) <= 48 and why in ("stop", "length") for n, why in answers)


@pytest.mark.slow
def test_chat_client_streams_from_a_server(tiny_llama):
    port = free_port()
    server = start_serve([str(tiny_llama), "--dtype", "float32", "--num-kv-blocks", "64",
                          "--num-threads", "1"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        out = _run("chat_client.py", "Hello there", timeout=120, DISTSERVE_URL=f"{url}/v1").stdout
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(30)
    name, prompt, generated, why = re.search(
        r"\((\S+): (\d+) prompt tokens, (\d+) generated, finished by (\w+)\)\n$", out).groups()
    assert name == tiny_llama.name and int(prompt) > 0 and why in ("stop", "length")
    assert 1 <= int(generated) <= 64
    counted = re.search(r'^distserve:generation_tokens_total\{[^}]*\} (\S+)$', metrics, re.M)
    assert float(counted.group(1)) == int(generated)   # what the server generated, all streamed


@pytest.mark.slow
def test_plan_serve_bench(tmp_path_factory, tokenizer_dir, tmp_path):
    model = build_tiny_model("llama", tmp_path_factory.mktemp("example-llama"), tokenizer_dir,
                             max_position_embeddings=2048)   # the planner's HumanEval fits
    port = free_port()
    out = _run("plan_serve_bench.py", "--model", str(model), "--cores", "2",
               "--num-prompts", "6", "--port", str(port), "--out", str(tmp_path),
               timeout=900).stdout
    for step in ("$ distserve profile", "$ distserve plan", "$ distserve serve", "$ distserve bench"):
        assert step in out
    rates = re.findall(r"at (\S+) req/s: ([\d.]+)% of (\d+) requests met both SLOs", out)
    assert len(rates) == 2 and all(n == "6" and 0 <= float(a) <= 100 for _, a, n in rates)
    assert "measured goodput:" in out and (tmp_path / "plan.yaml").is_file()
    with socket.socket() as s:   # the server is gone: its port can be listened on again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
