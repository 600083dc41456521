"""`serve --plan PLAN --adapt` for real: a server of the tiny Llama whose plan has one prefill
and two decode instances is sent prompts far longer than planned, so that (by the plan's own
latency model) one prefill instance cannot keep up; two checks later one decode instance has
become a prefill instance in place, /metrics counts it, and every request succeeded."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from distserve.planner.models import get_model
from distserve.planner.plan import PhasePlan, Plan
from helpers.serve_process import free_port, start_serve

pytestmark = pytest.mark.slow

# the plan's latency model (ms): prefill of a 100-token prompt ~66 ms, so one prefill
# instance keeps up with about 15 req/s of such prompts; decode steps of ~10 ms
ENTRY = {"prefill": [6.8, 0.5, 0.0009], "decoding_smallbs": [10.0, 0.002, 0.3],
         "decoding_largebs": [5.3, 0.002, 0.5], "decoding_large_small_bs_threshold": 32}


def role_switches(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("distserve:role_switches"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no distserve:role_switches on /metrics")


def test_serve_adapt_moves_a_decode_instance_to_prefill(tiny_llama, tmp_path):
    config = str(tiny_llama / "config.json")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"_hardware": "cpu", get_model(config).name: {"1": ENTRY}}))
    plan = Plan(model=config, hardware="cpu", nodes=1, gpus_per_node=3, workload="fixed:8:4",
                ttft_slo=2.0, tpot_slo=0.5, attainment_target=0.9, algorithm="whole",
                prefill=PhasePlan(1, 1, 1), decode=PhasePlan(1, 1, 2), goodput=5.0,
                goodput_per_gpu=1.7, latency_source={"profile": str(profile)})
    plan.save(str(tmp_path / "plan.yaml"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve([str(tiny_llama), "--plan", str(tmp_path / "plan.yaml"), "--adapt",
                        "--adapt-interval", "0.5", "--dtype", "float32", "--num-kv-blocks", "64",
                        "--no-pin-cpus"], port, timeout_s=180)
    try:
        prompt = list(range(5, 105))   # 100 tokens, against the plan's 8

        def one(i):
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(80)))
        assert codes == [200] * 80
        deadline = time.monotonic() + 60
        while role_switches(url) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert role_switches(url) == 1
        with ThreadPoolExecutor(8) as pool:   # served by 2 prefill + 1 decode now
            assert list(pool.map(one, range(16))) == [200] * 16
        assert role_switches(url) == 1   # the cool-down holds it there
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "becomes a prefill instance" in out and "adapting: every 0.5 s" in out
