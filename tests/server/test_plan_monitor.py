"""A server that runs a plan watches its workload: the lengths it serves against the plan's,
on /metrics and at /v1/observed_workload, and `distserve plan --from-metrics` re-plans from
them. A real server on 127.0.0.1 over the tiny Llama; the plan is a real plan document."""
import dataclasses
import json
import pathlib
import time

import httpx
import pytest

from distserve.planner.cli import main as planner_main
from distserve.planner.plan import PhasePlan, Plan
from distserve.server.plan_monitor import PlanMonitor, plan_predictor
from tests.server.conftest import _serving

PROMPT = list(range(5, 45))   # 40 prompt tokens, 6 out: far from the plan's 8 in / 4 out


def tiny_plan(model_dir, workload: str) -> Plan:
    return Plan(model=str(model_dir / "config.json"), hardware="a100-80g", nodes=1,
                gpus_per_node=1, workload=workload, ttft_slo=5.0, tpot_slo=1.0,
                attainment_target=0.9, algorithm="whole", prefill=PhasePlan(1, 1, 1),
                decode=PhasePlan(1, 1, 1), goodput=1.0, goodput_per_gpu=0.5, mode="colocated",
                colocated={"tp": 1, "pp": 1, "instances": 1})


@pytest.fixture(scope="module")
def planned(tiny_llama):
    monitor = PlanMonitor(tiny_plan(tiny_llama, "fixed:8:4"), None, min_requests=10, consecutive=2)
    yield from _serving(tiny_llama, num_kv_blocks=64, plan_monitor=monitor)
    monitor.close()


def gauges(url: str) -> dict:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("distserve:") and " " in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_a_workload_off_the_plan_is_found_exported_and_replanned_from(planned, tmp_path):
    monitor = planned.app.state.metrics.monitor
    with httpx.Client(base_url=planned.url, timeout=30) as http:
        for i in range(30):   # three batches of 10 fresh requests
            r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6,
                                                   "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200
    deadline = time.monotonic() + 20
    while monitor.checks < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert monitor.checks == 3 and monitor.drifts == 1
    assert monitor.last.drifted and {"input", "output"} <= set(monitor.last.rejected)
    g = gauges(planned.url)
    assert g['distserve:workload_drifted{model_name="tiny"}'] == 1
    assert g['distserve:workload_drifts{model_name="tiny"}'] == 1
    assert g['distserve:workload_mean_tokens{model_name="tiny",side="input",source="observed"}'] == 40
    assert g['distserve:workload_mean_tokens{model_name="tiny",side="input",source="planned"}'] == 8
    assert g['distserve:request_prompt_tokens_count{model_name="tiny"}'] == 30
    assert g['distserve:plan_arrival_rate{model_name="tiny"}'] > 0

    doc = httpx.get(f"{planned.url}/v1/observed_workload").json()
    assert doc["lengths"] == [[40, 6]] * 30 and doc["ttft_slo"] == 5.0
    out = tmp_path / "replan.json"
    assert planner_main(["plan", "--from-metrics", f"{planned.url}/metrics", "--gpus-per-node", "2",
                         "--num-requests", "100", "--seeds", "1", "-j", "1", "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["model"] and plan["ttft_slo"] == 5.0 and plan["tpot_slo"] == 1.0
    lengths = json.loads((tmp_path / "replan.workload.json").read_text())
    assert plan["workload"] == str(tmp_path / "replan.workload.json")
    assert lengths == [{"input_len": 40, "output_len": 6}] * 30
    planned.wait_idle()


def test_a_server_without_a_plan_has_no_observed_workload(served):
    r = httpx.get(f"{served.url}/v1/observed_workload")
    assert r.status_code == 404 and "--plan" in r.json()["error"]["message"]
    assert "workload_drifted" not in httpx.get(f"{served.url}/metrics").text


def test_the_plans_predicted_attainment_falls_as_the_rate_rises():
    """OPT-13B colocated on one A100 at the paper's chatbot SLOs (its goodput: a few req/s)."""
    plan = dataclasses.replace(tiny_plan(pathlib.Path("unused"), "sharegpt"),
                               model="facebook/opt-13b", ttft_slo=0.25, tpot_slo=0.1)
    predict = plan_predictor(plan, requests=200, seeds=(0,))
    light, heavy = predict(0.2), predict(50.0)
    assert light > 0.9 and heavy < 0.5


def test_serve_watches_the_plan_it_was_given(tmp_path, capsys):
    import argparse

    from distserve.server.cli import plan_monitor_from_args
    plan = dataclasses.replace(tiny_plan(pathlib.Path("unused"), "sharegpt"), model="facebook/opt-13b")
    plan.save(str(tmp_path / "plan.yaml"))
    args = argparse.Namespace(plan=str(tmp_path / "plan.yaml"), drift_batch=50, drift_checks=2)
    monitor = plan_monitor_from_args(args)
    assert monitor.predictor is not None and monitor.detector.min_requests == 50
    monitor.close()
    dataclasses.replace(plan, workload=str(tmp_path / "gone.json")).save(str(tmp_path / "gone.yaml"))
    assert plan_monitor_from_args(argparse.Namespace(plan=str(tmp_path / "gone.yaml"), drift_batch=50,
                                                     drift_checks=2)) is None
    assert "no drift detection" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--drift-batch"):
        plan_monitor_from_args(argparse.Namespace(plan=args.plan, drift_batch=5, drift_checks=2))


def test_adaptation_sees_the_last_window_not_the_whole_history():
    """After a shift, the lengths judged are the new ones only: the requests that finished in
    the window, and their arrival rate."""
    monitor = PlanMonitor(tiny_plan(pathlib.Path("unused"), "fixed:8:4"), None, min_requests=1000)
    for i in range(100):   # the old workload, 1 req/s, finished before t = 200
        monitor.record(arrival=float(i), finish=i + 1.0, input_len=100, output_len=400, met_both=True)
    for i in range(30):    # the new one, 2 req/s, finishing in [300, 315)
        monitor.record(arrival=300 + i / 2, finish=300.5 + i / 2, input_len=1900, output_len=20,
                       met_both=True)
    pairs, rate = monitor.recent_workload(60.0, now=320.0)
    assert pairs == [(1900, 20)] * 30 and rate == pytest.approx(2.0)
    pairs, rate = monitor.recent_workload(1000.0, now=320.0)
    assert len(pairs) == 130
    assert monitor.recent_workload(60.0, now=1000.0) == ([], 0.0)
    monitor.close()


def test_the_judged_rate_counts_requests_still_queued():
    """Under overload requests finish slower than they arrive, and out of order: the rate
    --adapt judges is that of the arrivals in the window, not of the finished requests'."""
    monitor = PlanMonitor(tiny_plan(pathlib.Path("unused"), "fixed:8:4"), None, min_requests=1000)
    for i in range(120):   # 2 req/s for 60 s; a third of them finished, spread out of order
        monitor.arrived(at=i / 2)
    for i in range(0, 120, 3):
        monitor.record(arrival=i / 2 + (7.5 if i % 2 else 0.0), finish=60.0, input_len=500,
                       output_len=10, met_both=False)
    pairs, rate = monitor.recent_workload(60.0, now=60.0)
    assert len(pairs) == 40 and rate == pytest.approx(2.0, rel=0.02)
    monitor.close()


def test_each_check_takes_one_batch_however_late_it_runs():
    """Requests recorded while a check runs (here the first is held up for 0.3 s): each later
    check still takes exactly one batch of 10, and all are checked without a new request."""
    monitor = PlanMonitor(tiny_plan(pathlib.Path("unused"), "fixed:8:4"), None, min_requests=10,
                          consecutive=2)
    sizes = []
    real = monitor.detector.check

    def slow_first(inputs, *args, **kwargs):   # the real check, the first one late
        if not sizes:
            time.sleep(0.3)
        sizes.append(len(inputs))
        return real(inputs, *args, **kwargs)

    monitor.detector.check = slow_first
    for i in range(35):
        monitor.record(arrival=float(i), finish=i + 1.0, input_len=40, output_len=6, met_both=True)
    deadline = time.monotonic() + 20
    while monitor.checks < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)   # no fourth check may follow: 5 requests are not a batch
    assert sizes == [10, 10, 10] and monitor.checks == 3
    monitor.close()
