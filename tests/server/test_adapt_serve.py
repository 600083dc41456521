"""`serve --plan PLAN --adapt` for real: a server of the tiny Llama whose plan has one prefill
and two decode instances is sent prompts far longer than planned, so that (by the plan's own
latency model, at its own speed) one prefill instance cannot keep up; two checks later one
decode instance has become a prefill instance in place, /metrics counts it, and every request
succeeded. By default the checks score at the speed the instances' steps really ran, which
/metrics shows against the plan's profile."""
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


def write_plan(tiny_llama, tmp_path, prefill: int, decode: int, entry: dict = ENTRY) -> str:
    """A plan of one-instance phases over a fictional profile (ENTRY); its path."""
    config = str(tiny_llama / "config.json")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"_hardware": "cpu", get_model(config).name: {"1": entry}}))
    plan = Plan(model=config, hardware="cpu", nodes=1, gpus_per_node=prefill + decode,
                workload="fixed:8:4", ttft_slo=2.0, tpot_slo=0.5, attainment_target=0.9,
                algorithm="whole", prefill=PhasePlan(1, 1, prefill),
                decode=PhasePlan(1, 1, decode), goodput=5.0, goodput_per_gpu=1.7,
                latency_source={"profile": str(profile)})
    plan.save(str(tmp_path / "plan.yaml"))
    return str(tmp_path / "plan.yaml")


def send(url: str, n: int, at_once: int = 8, rate: float | None = None) -> list[int]:
    """n completions of a 100-token prompt (the plan's are 8 tokens): `at_once` at a time, or
    at `rate` req/s whatever the server's speed (the rate the checks see is then the test's,
    not the machine's: one request per thread, each sent at its own time)."""
    prompt = list(range(5, 105))
    workers = n if rate is not None else at_once
    # one client for every send: none builds its own client (and TLS context) on the clock
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with httpx.Client(base_url=url, timeout=60, limits=limits) as client:
        start = time.monotonic()

        def one(i):
            if rate is not None:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            return client.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}).status_code

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(n)))


def test_serve_adapt_moves_a_decode_instance_to_prefill(tiny_llama, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # at the profile's speed: the real tiny model's prefill is far faster than the profile's
    proc = start_serve([str(tiny_llama), "--plan", write_plan(tiny_llama, tmp_path, 1, 2),
                        "--adapt", "--adapt-interval", "0.5", "--adapt-speed", "profile",
                        "--dtype", "float32", "--num-kv-blocks", "64", "--no-pin-cpus"],
                       port, timeout_s=180)
    try:
        # 25 req/s: one prefill instance keeps up with ~15, two with ~30 (by the profile); sent
        # closed-loop instead, the rate was the machine's and a loaded one fell under 15
        codes = send(url, 80, rate=25.0)
        assert codes == [200] * 80
        deadline = time.monotonic() + 60
        while role_switches(url) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert role_switches(url) == 1
        assert send(url, 16) == [200] * 16   # served by 2 prefill + 1 decode now
        assert role_switches(url) == 1   # the cool-down holds it there
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "becomes a prefill instance" in out and "adapting: every 0.5 s" in out


def step_speed(url: str) -> dict[str, float]:
    return {line.split('phase="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(f"{url}/metrics").text.splitlines()
            if line.startswith("distserve:plan_model_step_speed{")}


def test_serve_adapt_measures_the_steps_speed_against_the_plan(tiny_llama, tmp_path):
    """The profile says a 100-token prefill takes 660 ms; the tiny model takes a few, tens on
    a loaded machine: the checks see its prefill steps run at a small fraction of the
    profile's time."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slow_prefill = {**ENTRY, "prefill": [68.0, 5.0, 0.009]}
    proc = start_serve([str(tiny_llama), "--plan", write_plan(tiny_llama, tmp_path, 1, 1, slow_prefill),
                        "--adapt", "--adapt-interval", "0.5", "--dtype", "float32",
                        "--num-kv-blocks", "64", "--no-pin-cpus"], port, timeout_s=180)
    try:
        assert step_speed(url) == {}   # nothing measured before a check saw steps
        # one at a time: a prefill step each (the checks want 5 steps of a phase)
        assert send(url, 30, at_once=1) == [200] * 30
        deadline = time.monotonic() + 30
        while len(step_speed(url)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        speed = step_speed(url)
        assert set(speed) == {"prefill", "decode"}
        assert 0 < speed["prefill"] < 0.5 and speed["decode"] > 0
        assert role_switches(url) == 0   # one of each: nothing to move
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
