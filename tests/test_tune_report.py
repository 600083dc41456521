"""`distserve tune`'s error bars without serving anything: the band each rate's prediction
carries is taken around the very prediction the accuracy criterion uses, the compared
deployment gets its own band, and the report shows them (markdown columns, a PNG)."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from distserve.planner.plan import PhasePlan, Plan
from distserve.planner.planning import planned_deployment
from distserve.planner.reality_check import replay, runs_of, trace_of
from distserve.planner.simulator import simulate
from distserve.planner.workload import Lengths, make_trace
from distserve.tune.loop import TuneConfig, alternative_of, band_of, problem_for
from distserve.tune.report import render, write_report

ENTRY = {"prefill": [6.8, 0.5, 0.0009], "decoding_smallbs": [10.0, 0.002, 0.3],
         "decoding_largebs": [5.3, 0.002, 0.5], "decoding_large_small_bs_threshold": 32}
SLO = {"ttft": 0.5, "tpot": 0.03}


def profile(tmp: pathlib.Path) -> str:
    path = tmp / "profile.json"
    path.write_text(json.dumps({"_hardware": "cpu", "SmolLM2-135M": {"1": ENTRY}, "_fit_error": {
        "SmolLM2-135M": {"prefill": {"mean": 0.03, "max": 0.1}, "decode": {"mean": 0.05, "max": 0.2}}}}))
    return str(path)


def disaggregated_plan() -> Plan:
    return Plan("SmolLM2-135M", "cpu", 1, 2, "humaneval", SLO["ttft"], SLO["tpot"], 0.9, "whole",
                PhasePlan(1, 1, 1), PhasePlan(1, 1, 1), goodput=3.0, goodput_per_gpu=1.5,
                colocated={"tp": 1, "pp": 1, "instances": 2})


def bench_doc(p, plan, rate: float, n: int) -> dict:
    """A `distserve bench` result whose latencies are the plan's simulated ones on a machine
    10% slower than the profile (what the fit band is there to cover)."""
    trace = make_trace(Lengths("humaneval-trace"), n, rate, seed=3)
    slow = simulate(trace, planned_deployment(problem_for_speed(p, 1.1), plan))
    reqs = [{"send_time": 50.0 + float(a), "input_len": int(i), "output_len": int(o),
             "expected_output_len": int(o), "success": True, "ttft": float(t), "tpot": float(q)}
            for a, i, o, t, q in zip(trace.arrival, trace.input_len, trace.output_len, slow.ttft, slow.tpot)]
    return {"request_rate": rate, "requests": reqs}


def problem_for_speed(p, k: float):
    from dataclasses import replace
    return replace(p, speed={"prefill": k, "decode": k})


@pytest.fixture
def setting(tmp_path):
    cfg = TuneConfig(None, "humaneval", SLO["ttft"], SLO["tpot"], tmp_path, profile(tmp_path),
                     cores=2, plan_requests=60)
    return cfg, problem_for(cfg, cfg.latency_profile, None), disaggregated_plan()


def test_the_band_is_taken_around_the_prediction_the_accuracy_criterion_uses(setting):
    cfg, p, plan = setting
    doc = bench_doc(p, plan, 8.0, 60)
    row = replay(doc, planned_deployment(p, plan), SLO)[0]
    trace, _ = trace_of(runs_of(doc)[0])
    widths = {"prefill": 0.12, "decode": 0.12}
    band = band_of(p, plan, trace, 8.0, SLO, widths, range(3))
    assert band["point"] == row["predicted"]["attainment"]
    assert band["low"] <= band["point"] <= band["high"] and len(band["by_seed"]) == 3
    # the "machine" ran 10% slow: within a 12% fit band, so the measured point falls inside it
    assert band["fit"][0] <= row["measured"]["attainment"] + 1e-9


def test_the_compared_deployment_is_the_best_colocated_one_beside_a_disaggregated_plan(setting):
    cfg, p, plan = setting
    alt = alternative_of(plan)
    assert alt.mode == "colocated" and alt.colocated == plan.colocated
    back = alternative_of(alt)
    assert back.mode == "disaggregated" and back.prefill == plan.prefill
    no_colocated = Plan(**{**plan.__dict__, "colocated": None})
    assert alternative_of(no_colocated) is None
    trace, _ = trace_of(bench_doc(p, plan, 8.0, 40))
    band = band_of(p, alt, trace, 8.0, SLO, {"prefill": 0.05, "decode": 0.05}, range(2))
    assert band["point"] == pytest.approx(
        replay(bench_doc(p, plan, 8.0, 40), planned_deployment(p, alt), SLO)[0]["predicted"]["attainment"])


def round_doc(p, plan, with_bands: bool) -> dict:
    rates = [4.0, 8.0, 12.0]
    runs = []
    for rate in rates:
        doc = bench_doc(p, plan, rate, 40)
        row = replay(doc, planned_deployment(p, plan), SLO)[0] | {"rate": rate, "repeats": [0.5],
                                                                  "spread_pp": 10.0, "bound_pp": 10.0,
                                                                  "holds": True}
        if with_bands:
            trace, _ = trace_of(doc)
            w = {"prefill": 0.05, "decode": 0.05}
            row["band"] = band_of(p, plan, trace, rate, SLO, w, range(3))
            row["inside"] = row["band"]["low"] <= row["measured"]["attainment"] <= row["band"]["high"]
            row["alternative"] = band_of(p, alternative_of(plan), trace, rate, SLO, w, range(3))
        runs.append(row)
    r = {"round": 1, "plan": plan.to_dict(), "predicted_goodput": 8.0, "speed_planned": None,
         "speed_measured": {"prefill": 1.1, "decode": 1.1}, "runs": runs}
    if with_bands:
        r["band"] = {"fit_error": {"prefill": 0.03, "decode": 0.05}, "speed_spread": None,
                     "widths": {"prefill": 0.03, "decode": 0.05}, "seeds": 3,
                     "alternative": "colocated 2 x (TP 1, PP 1)"}
    return {"model": "SmolLM2-135M", "workload": "humaneval", "ttft_slo": SLO["ttft"],
            "tpot_slo": SLO["tpot"], "cores": 2, "stopped": "rounds", "rounds": [r]}


def test_the_report_shows_each_rates_band_and_whether_the_measured_point_is_inside(setting, tmp_path):
    cfg, p, plan = setting
    doc = round_doc(p, plan, with_bands=True)
    md = render(doc)
    assert "| predicted [low, high] | fit band | seed band | inside |" in md
    assert "colocated 2 x (TP 1, PP 1), predicted [low, high] |" in md
    for run in doc["rounds"][0]["runs"]:
        b = run["band"]
        cells = (f"| [{100 * b['low']:.1f}, {100 * b['high']:.1f}] | "
                 f"[{100 * b['fit'][0]:.1f}, {100 * b['fit'][1]:.1f}] | "
                 f"[{100 * b['seeds'][0]:.1f}, {100 * b['seeds'][1]:.1f}] | "
                 f"{'yes' if run['inside'] else 'no'} |")
        assert cells in md
    assert "prefill ±3.0%, decode ±5.0%" in md and "3 other samples" in md
    write_report(doc, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["rounds"][0]["runs"][0]["band"]
    assert (tmp_path / "attainment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_from_before_the_bands_still_renders(setting):
    cfg, p, plan = setting
    md = render(round_doc(p, plan, with_bands=False))
    rows = [line for line in md.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 1 and "| - | - | - | - |" in rows[0] and "Bands:" not in md
    assert np.isfinite(float(rows[0].split("|")[2].strip().rstrip("%")))
