"""`simulate` and `plan` calibrated to this machine: --speed, --step-traces (what real instances
write, read back as per-phase factors) and --replay (a bench result's own arrivals simulated)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from distserve.bench.metrics import RequestRecord
from distserve.bench.report import record_json
from distserve.cluster.step_trace import StepTrace
from distserve.planner.cli import main
from distserve.planner.latency import instance_latency
from distserve.planner.models import get_model
from distserve.planner.simulator import Disaggregated, InstanceConfig, simulate
from distserve.planner.workload import Trace

FAST = ["--num-requests", "50", "--seeds", "1", "--jobs", "1"]
SIM = ["simulate", "--model", "opt-13b", "--ttft-slo", "1", "--tpot-slo", "0.2", "--workload",
       "fixed:512:8", "--rate", "0.05", "--json", *FAST]


def _ttft_p50(capsys, *extra) -> tuple[float, dict]:
    assert main([*SIM, *extra]) == 0
    doc = json.loads(capsys.readouterr().out)
    return doc["rates"][0]["ttft"]["p50"], doc


def test_speed_stretches_each_phase_by_its_factor(capsys):
    base, doc = _ttft_p50(capsys)
    assert "speed" not in doc
    slow, doc = _ttft_p50(capsys, "--speed", "2:1")
    assert slow == pytest.approx(2 * base, rel=1e-6)       # requests alone: TTFT is the prefill
    assert doc["speed"] == {"prefill": 2.0, "decode": 1.0}
    assert doc["rates"][0]["tpot"]["p50"] == pytest.approx(
        _ttft_p50(capsys)[1]["rates"][0]["tpot"]["p50"], rel=1e-6)


def test_step_traces_give_the_speed_the_instances_ran_at(capsys, tmp_path):
    entry = instance_latency(get_model("opt-13b"), 1, 1, "distserve").entry
    prefill, decode = StepTrace(tmp_path / "prefill-0.jsonl"), StepTrace(tmp_path / "decode-0.jsonl")
    t = 1000.0
    for i in range(5):   # steps 1 s apart, each 3x (prefill) and 1.5x (decode) the profile
        req = SimpleNamespace(request_id=f"r{i}", num_computed_tokens=0)
        prefill.step(t, t + 3 * entry.prefill_ms([512]) * 1e-3, [(req, 512)], [])
        decode.step(t, t + 1.5 * entry.decode_ms([600, 700]) * 1e-3, [],
                    [SimpleNamespace(num_tokens=600), SimpleNamespace(num_tokens=700)])
        t += 1.0
    prefill.close()
    decode.close()
    _, doc = _ttft_p50(capsys, "--step-traces", str(tmp_path))
    assert doc["speed"]["prefill"] == pytest.approx(3.0) and doc["speed"]["decode"] == pytest.approx(1.5)


@pytest.mark.parametrize("extra,message", [
    (["--speed", "0"], "--speed must be"),
    (["--speed", "1:2:3"], "--speed must be"),
    (["--speed", "nan"], "--speed must be"),
    (["--speed", "2", "--step-traces", "."], "not both"),
    (["--step-traces", "/nonexistent"], "is not a folder"),
])
def test_bad_calibration_is_one_clear_line(capsys, extra, message):
    for cmd in (SIM, ["plan", "--model", "opt-13b", "--ttft-slo", "1", "--tpot-slo", "0.2", *FAST]):
        assert main([*cmd, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_an_empty_trace_folder_is_refused(capsys, tmp_path):
    assert main([*SIM, "--step-traces", str(tmp_path)]) == 2
    assert "holds no model steps" in capsys.readouterr().err


def test_plan_searches_at_the_calibrated_speed(capsys):
    argv = ["plan", "--model", "opt-13b", "--ttft-slo", "0.4", "--tpot-slo", "0.1",
            "--gpus-per-node", "2", "--no-compare", "--json", *FAST]
    assert main(argv) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main([*argv, "--speed", "1.5"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert slow["goodput_per_gpu"] < fast["goodput_per_gpu"]


def _bench_result(trace: Trace, ttft, tpot, rate: float) -> dict:
    """A `distserve bench --save-result` document of requests that saw these latencies."""
    records = []
    for send, n_in, n_out, a, b in zip(trace.arrival, trace.input_len, trace.output_len, ttft, tpot):
        r = RequestRecord(int(n_in), int(n_out), True, "", int(n_out), float(send) + 5.0, float(a),
                          float(a + b * (n_out - 1)))
        records.append(record_json(r))
    return {"request_rate": rate, "num_success": len(records), "num_failed": 0, "requests": records}


def test_replay_puts_the_measured_beside_the_simulation_of_its_own_arrivals(capsys, tmp_path):
    inst = InstanceConfig(instance_latency(get_model("opt-13b"), 1, 1, "distserve"), 10 ** 6)
    rng = np.random.default_rng(0)
    trace = Trace(np.sort(rng.uniform(0, 20, 40)), rng.integers(100, 1500, 40), rng.integers(2, 50, 40))
    sim = simulate(trace, Disaggregated(inst, inst, kv_bytes_per_token=0))
    exact = tmp_path / "exact.json"
    exact.write_text(json.dumps(_bench_result(trace, sim.ttft, sim.tpot, 2.0)))
    late = tmp_path / "late.json"
    late.write_text(json.dumps({"kind": "rate_sweep", "runs": [
        _bench_result(trace, sim.ttft + 30.0, sim.tpot, 2.0)]}))
    argv = ["simulate", "--model", "opt-13b", "--ttft-slo", "5", "--tpot-slo", "1", "--json",
            "--link-bandwidth", "inf", *FAST]
    assert main([*argv, "--replay", str(exact)]) == 0
    run = json.loads(capsys.readouterr().out)["replay"]["runs"][0]
    assert run["requests"] == 40 and run["error_pp"] == pytest.approx(0.0)
    assert run["measured"]["ttft_p90"] == pytest.approx(run["predicted"]["ttft_p90"])
    assert main([*argv, "--replay", str(late)]) == 0
    run = json.loads(capsys.readouterr().out)["replay"]["runs"][0]
    assert run["measured"]["attainment"] == 0.0 and run["error_pp"] == pytest.approx(100.0)
    (tmp_path / "bad.json").write_text("[1, 2")
    assert main([*argv, "--replay", str(tmp_path / "bad.json")]) == 2
    assert "not a readable bench result" in capsys.readouterr().err
