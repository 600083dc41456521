import math

import pytest

from distserve.bench.metrics import RequestRecord
from distserve.bench.report import format_sweep
from distserve.bench.sweep import parse_values, rate_sweep, scale_sweep


def test_parse_values():
    assert parse_values("0.5,1,2,4", "--request-rate") == [0.5, 1.0, 2.0, 4.0]
    assert parse_values("1:2:0.25", "--request-rate") == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert parse_values("0.4:1:0.2", "--slo-scale") == [0.4, 0.6, 0.8, 1.0]
    assert parse_values("inf", "--request-rate") == [math.inf]
    assert parse_values("2,1,2", "--request-rate") == [1.0, 2.0]
    for bad in ("", "a", "0", "-1", "1:0:1", "1:2:0", "nan"):
        with pytest.raises(ValueError):
            parse_values(bad, "--request-rate")


def result(rate, attainment, throughput=1.0):
    return {"request_rate": rate, "request_throughput": throughput, "request_goodput": throughput * attainment,
            "slo_attainment": attainment, "ttft_attainment": 1.0, "tpot_attainment": attainment,
            "num_success": 10, "num_failed": 0, "duration": 10.0}


def test_rate_sweep_goodput_per_gpu():
    sweep = rate_sweep([result(1, 1.0), result(2, 0.95), result(3, 0.85), result("inf", 0.0)], 0.9, num_gpus=3)
    assert sweep["goodput"] == pytest.approx(2.5) and sweep["per_gpu_goodput"] == pytest.approx(2.5 / 3)
    assert sweep["crossing"]["bound"] == "interpolated" and sweep["monotonic"]
    text = format_sweep(sweep)
    assert "0.833 req/s per GPU (3 GPUs; 2.500 req/s in all) (interpolated)" in text and "Note" not in text


def test_rate_sweep_flags_a_noisy_curve():
    sweep = rate_sweep([result(1, 0.8), result(2, 0.95), result(3, 0.5)], 0.9, num_gpus=1)
    assert not sweep["monotonic"]
    assert "Note: attainment should fall" in format_sweep(sweep)


def test_scale_sweep_recomputes_attainment_from_one_run():
    records = [RequestRecord(5, 3, success=True, output_len=3, ttft=t, last_token_time=t + 0.08, e2el=t + 0.1)
               for t in (0.1, 0.2, 0.3, 0.4)]
    run = {"request_rate": 1.0, "request_throughput": 4 / 8, "num_failed": 0, "duration": 8.0}
    sweep = scale_sweep(records, run, [0.5, 1.0, 2.0], ttft_slo=0.2, tpot_slo=0.1, target=0.75)
    # every TPOT is 0.04 s; the TTFT SLO at scale 0.5 is 0.1 s (1 of 4), at 1 0.2 s (2 of 4), at 2 all
    assert [p["slo_attainment"] for p in sweep["points"]] == [0.25, 0.5, 1.0]
    assert sweep["min_slo_scale"] == pytest.approx(1.5) and sweep["monotonic"]
    assert sweep["points"][1]["request_goodput"] == pytest.approx(2 / 8)
