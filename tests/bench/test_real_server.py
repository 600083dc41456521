"""A rate sweep against our own server (`distserve serve`, the default SmolLM2 model) on
loopback: the numbers must be sane and consistent with each other."""

import importlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from distserve.bench import cli


def _server_available() -> bool:
    try:
        module = importlib.import_module("distserve.server")
    except ImportError:
        return False
    return getattr(module, "__file__", None) is not None  # not just an empty folder


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _server_available(), reason="distserve.server does not import yet")]

NUM_PROMPTS, OUTPUT_LEN, RATES = 8, 32, (2.0, 8.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "distserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--num-threads", "1", "--kv-cache-memory", "0.25"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"distserve serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base_url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"distserve serve not ready after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_rate_sweep_against_our_server(real_server, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = cli.main(["--base-url", real_server, "--dataset", "random", "--random-input-len", "64",
                     "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS),
                     "--request-rate", ",".join(map(str, RATES)), "--ignore-eos",
                     "--ttft-slo", "1.0", "--tpot-slo", "0.2", "--request-timeout", "120",
                     "--disable-tqdm", "--save-result", str(out), "--plot", str(png)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["num_success"] + doc["num_failed"] == NUM_PROMPTS * len(RATES)
    assert doc["num_failed"] == 0, [r["error"] for run in doc["runs"] for r in run["requests"] if r["error"]]
    for run in doc["runs"]:
        assert run["num_success"] + run["num_failed"] == len(run["requests"]) == NUM_PROMPTS
        assert run["request_goodput"] <= run["request_throughput"] + 1e-12
        assert run["request_throughput"] <= NUM_PROMPTS / run["duration"] + 1e-9
        assert run["slo_attainment"] <= min(run["ttft_attainment"], run["tpot_attainment"])
        assert run["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        for r in run["requests"]:
            assert r["output_len"] == OUTPUT_LEN  # --ignore-eos: the dataset's length exactly
            assert 0 < r["ttft"] <= r["e2el"] and 0 < r["tpot"] < r["e2el"]
            assert r["send_time"] + r["e2el"] <= run["duration"] + 1e-6
            assert len(r["itl"]) >= 1
    crossing = doc["crossing"]
    if crossing["bound"] == "interpolated":
        assert RATES[0] <= crossing["value"] <= RATES[1]
    assert doc["per_gpu_goodput"] is None or doc["per_gpu_goodput"] <= doc["goodput"]
    assert png.stat().st_size > 0
