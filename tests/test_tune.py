"""`distserve tune` on a tiny model with a short budget: it profiles, plans, serves the plan,
measures it, sets the prediction beside it, refits and re-plans, writes its report, and
leaves no process behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_tune_plans_serves_measures_and_reports(tmp_path_factory, tokenizer_dir):
    model = build_tiny_model("llama", tmp_path_factory.mktemp("tune-llama"), tokenizer_dir,
                             max_position_embeddings=2048)
    out = tmp_path_factory.mktemp("tune-report")
    cmd = [sys.executable, "-m", "distserve.cli", "tune", str(model), "--workload", "humaneval",
           "--ttft-slo", "2", "--tpot-slo", "0.5", "-o", str(out), "--rounds", "2",
           "--num-rates", "2", "--num-prompts", "6", "--plan-requests", "60", "--cores", "2",
           "--repeats", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["stopped"] in ("converged", "rounds") and 1 <= len(doc["rounds"]) <= 2
    for r in doc["rounds"]:
        assert len(r["runs"]) == 2 and r["plan"]["model"] == doc["model"]
        for run in r["runs"]:
            assert 6 <= run["requests"] <= 30 and 0 <= run["measured"]["attainment"] <= 1
            assert 0 <= run["predicted"]["attainment"] <= 1 and isinstance(run["holds"], bool)
            assert len(run["repeats"]) == 1 and run["bound_pp"] >= 3.0   # the same trace again
            assert run["spread_pp"] == pytest.approx(
                100 * abs(run["repeats"][0] - run["measured"]["attainment"]))
            band = run["band"]   # the prediction's error bars: fit and seeds
            assert band["low"] <= run["predicted"]["attainment"] <= band["high"]
            assert band["point"] == run["predicted"]["attainment"] and len(band["by_seed"]) == 5
            assert run["inside"] == (band["low"] <= run["measured"]["attainment"] <= band["high"])
        assert all(w > 0 for w in r["band"]["widths"].values())   # the profile's own fit error
        assert len(r["speed_by_run"]) == 4   # 2 rates x 2 runs, each with its own speed
    assert doc["rounds"][0]["speed_measured"]   # the step traces gave the served speed
    if len(doc["rounds"]) == 2:
        assert doc["rounds"][1]["speed_planned"] == doc["rounds"][0]["speed_measured"]
        assert doc["rounds"][1]["band"]["speed_spread"]   # round 1's runs moved its fit band
    for name in ("report.md", "attainment.png", "plan.yaml", "profile.json"):
        assert (out / name).stat().st_size > 0
    assert "| predicted [low, high] |" in (out / "report.md").read_text()
    assert _processes_mentioning(str(out)) == []   # the servers and their instances are gone


def test_the_accuracy_bound_is_three_points_or_realitys_own_spread():
    from distserve.tune.loop import accuracy
    row = {"measured": {"attainment": 0.80}, "error_pp": 5.0}
    assert accuracy(row, [])["holds"] is False and accuracy(row, [])["spread_pp"] is None
    wide = accuracy(row, [0.86, 0.79])          # the same trace gave 79-86%: a 7-point spread
    assert wide["spread_pp"] == pytest.approx(7.0) and wide["holds"] is True


def test_a_bad_speed_is_named_before_anything_runs(tmp_path):
    """--speed (the first round's speed, to go on from an earlier tune) is checked up front:
    a CLI message naming the value, exit 2, no report folder and no profiling started."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "distserve.cli", "tune", "--ttft-slo", "1",
                           "--tpot-slo", "0.1", "--speed", "0:1", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--speed" in done.stderr and "'0:1'" in done.stderr
    assert not out.exists()
