"""vLLM as a peer: `vllm bench serve` commands and their detailed results read with our SLO
definitions (no vLLM needed)."""
from __future__ import annotations

import pytest

from distserve.bench.sweep import rate_sweep
from distserve.bench.vllm_peer import bench_serve_command, request_latencies, run_point, single_request


def _result(rate=2.0):
    # three served requests (one of a single token) and one that failed
    return {"request_rate": rate, "duration": 4.0, "request_throughput": 0.75, "request_goodput": 0.5,
            "ttfts": [0.2, 0.6, 0.1, 0.0], "latencies": [1.2, 1.6, 0.1, 0.0],
            "output_lens": [11, 11, 1, 0], "input_lens": [8, 8, 8, 8],
            "errors": ["", "", "", "Traceback: connection reset"]}


def test_tpot_is_e2el_minus_ttft_over_tokens_after_the_first():
    ttfts, tpots = request_latencies(_result())
    assert ttfts == [0.2, 0.6, 0.1, None]
    assert tpots[:3] == pytest.approx([0.1, 0.1, 0.0]) and tpots[3] is None


def test_run_point_attainment_counts_failures_as_misses():
    p = run_point(_result(), ttft_slo=0.5, tpot_slo=0.15)
    assert p["slo_attainment"] == 0.5          # requests 0 and 2 of 4
    assert p["ttft_attainment"] == 0.5 and p["tpot_attainment"] == 0.75
    assert p["request_goodput"] == pytest.approx(2 / 4.0)
    assert p["num_success"] == 3 and p["num_failed"] == 1 and p["request_rate"] == 2.0
    assert run_point({**_result(), "request_rate": "inf"}, 0.5, 0.15)["request_rate"] == "inf"


def test_points_make_a_rate_sweep():
    points = [run_point(_result(r), 0.7, 0.15) for r in (1.0, 2.0)]
    points[0]["slo_attainment"], points[1]["slo_attainment"] = 1.0, 0.5
    sweep = rate_sweep(points, 0.9, 1)
    assert sweep["crossing"]["bound"] == "interpolated" and sweep["goodput"] == pytest.approx(1.2)


def test_single_request_medians_and_clear_errors():
    lone = single_request(_result())
    assert lone["ttft_s"] == 0.1 and lone["tpot_s"] == pytest.approx(0.1)   # the best ones
    assert lone["median_ttft_s"] == 0.2 and lone["median_tpot_s"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="--save-detailed"):
        request_latencies({"duration": 1.0})
    with pytest.raises(RuntimeError, match="every request failed"):
        single_request({**_result(), "errors": ["boom"] * 4})


def test_several_sweeps_on_one_figure(tmp_path):
    from distserve.bench.plot import plot_rate_sweeps
    a = rate_sweep([run_point(_result(r), 0.7, 0.15) for r in (1.0, 2.0)], 0.5, 1)
    b = rate_sweep([run_point(_result(r), 0.1, 0.01) for r in (1.0, 2.0)], 0.5, 1)
    png = tmp_path / "peers.png"
    plot_rate_sweeps({"ours": a, "vllm": b}, str(png), "two systems")
    assert png.stat().st_size > 1000


def test_bench_serve_command_saves_details_and_takes_slos_in_seconds(tmp_path):
    cmd = bench_serve_command(tmp_path / "python", "http://127.0.0.1:8000", "/m", "m", 512, 128, 40,
                              tmp_path / "r.json", rate=2.0, seed=3, ttft_slo=0.5, tpot_slo=0.05)
    assert cmd[0] == str(tmp_path / "python") and "--save-detailed" in cmd and "--ignore-eos" in cmd
    assert cmd[cmd.index("--goodput") + 1:] == ["ttft:500", "tpot:50"]
    assert cmd[cmd.index("--result-filename") + 1] == "r.json" and cmd[cmd.index("--request-rate") + 1] == "2.0"
    lone = bench_serve_command(tmp_path / "python", "u", "/m", "m", 8, 4, 2, tmp_path / "r.json", max_concurrency=1)
    assert "--goodput" not in lone and lone[lone.index("--max-concurrency") + 1] == "1"
