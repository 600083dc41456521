"""Metric definitions checked on hand-built timestamp records."""

import math

import pytest

from distserve.bench.metrics import (
    RequestRecord, attainment, highest_crossing, lowest_crossing, summarize, tpot)


def record(token_times, send=0.0, end=None, output_len=None, success=True, input_len=10):
    """A request sent at `send` whose tokens arrived at the absolute `token_times`."""
    times = [t - send for t in token_times]
    return RequestRecord(
        input_len=input_len, expected_output_len=len(times), success=success,
        error="" if success else "boom", output_len=output_len if output_len is not None else len(times),
        send_time=send, ttft=times[0], last_token_time=times[-1],
        e2el=(end if end is not None else token_times[-1]) - send,
        itl=[b - a for a, b in zip(times, times[1:])])


def test_ttft_tpot_itl_from_timestamps():
    r = record([1.5, 1.7, 1.9, 2.5], send=1.0, end=2.6)
    assert r.ttft == pytest.approx(0.5)
    # TPOT excludes the first token: (2.5 - 1.5) / (4 - 1)
    assert tpot(r) == pytest.approx(1.0 / 3)
    assert r.itl == pytest.approx([0.2, 0.2, 0.6])
    s = summarize([r], duration=2.0)
    assert s["mean_ttft_ms"] == pytest.approx(500.0)
    assert s["mean_tpot_ms"] == pytest.approx(1000.0 / 3)
    assert s["mean_itl_ms"] == pytest.approx(1000.0 / 3)
    assert s["median_itl_ms"] == pytest.approx(200.0)
    assert s["mean_e2el_ms"] == pytest.approx(1600.0)


def test_tpot_uses_the_reported_output_len_not_the_chunk_count():
    # two chunks carrying 5 tokens in all (a server that batches its stream)
    r = record([0.1, 0.9], output_len=5)
    assert tpot(r) == pytest.approx(0.8 / 4)


def test_single_token_output_has_zero_tpot_and_no_tpot_stat():
    r = record([0.3])
    assert tpot(r) == 0.0
    s = summarize([r], duration=1.0, tpot_slo=0.001)
    assert s["mean_tpot_ms"] is None
    assert s["slo_attainment"] == 1.0


def test_attainment_counts_failures_and_each_slo():
    fast = record([0.1, 0.2, 0.3])          # TTFT 0.1, TPOT 0.1
    slow_first = record([0.6, 0.7, 0.8])    # TTFT 0.6, TPOT 0.1
    slow_decode = record([0.1, 0.6, 1.1])   # TTFT 0.1, TPOT 0.5
    failed = RequestRecord(input_len=5, expected_output_len=3, error="HTTP 500: x")
    records = [fast, slow_first, slow_decode, failed]
    both, ttft_only, tpot_only = attainment(records, ttft_slo=0.5, tpot_slo=0.2)
    assert (both, ttft_only, tpot_only) == (0.25, 0.5, 0.5)
    s = summarize(records, duration=2.0, ttft_slo=0.5, tpot_slo=0.2)
    assert s["num_success"] + s["num_failed"] == s["num_requests"] == 4
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["request_goodput"] == pytest.approx(0.5)
    assert s["request_goodput"] <= s["request_throughput"]
    assert s["total_output_tokens"] == 9
    # an SLO not given is met by every successful request
    assert attainment(records, ttft_slo=0.5, tpot_slo=None)[0] == 0.5


def test_slo_boundary_is_inclusive():
    r = record([0.25, 0.35])
    assert attainment([r], ttft_slo=0.25, tpot_slo=0.1 + 1e-12)[0] == 1.0


def test_no_slo_means_no_attainment_or_goodput():
    s = summarize([record([0.1, 0.2])], duration=1.0)
    assert s["slo_attainment"] is None and s["request_goodput"] is None


def test_empty_run_is_all_none_not_nan():
    s = summarize([], duration=0.0)
    assert s["num_requests"] == 0 and s["mean_ttft_ms"] is None and s["p99_e2el_ms"] is None


def test_percentiles():
    records = [record([t, t + 0.1]) for t in (0.1, 0.2, 0.3, 0.4, 1.0)]
    s = summarize(records, duration=1.0)
    assert s["median_ttft_ms"] == pytest.approx(300.0)
    assert s["p90_ttft_ms"] == pytest.approx(760.0)  # linear: 0.4 + 0.6 * (1.0 - 0.4)
    assert s["p99_ttft_ms"] == pytest.approx(976.0)


def test_rate_crossing_interpolates_linearly():
    c = highest_crossing([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.5], target=0.9)
    assert c.bound == "interpolated"
    assert c.value == pytest.approx(2.5)


def test_rate_crossing_takes_the_highest_rate_meeting_the_target():
    # a noisy curve: dips below at 2, back above at 3
    c = highest_crossing([4, 1, 3, 2], [0.0, 1.0, 0.92, 0.88], target=0.9)
    assert c.value == pytest.approx(3 + 0.02 / 0.92)


def test_rate_crossing_bounds():
    assert highest_crossing([1, 2], [0.99, 0.95], 0.9).bound == "lower_bound"
    assert highest_crossing([1, 2], [0.99, 0.95], 0.9).value == 2
    none = highest_crossing([1, 2], [0.5, 0.4], 0.9)
    assert none.value is None and none.bound == "not_reached"
    assert highest_crossing([1, 2], [0.9, 0.5], 0.9).value == 1


def test_scale_crossing_interpolates_linearly():
    c = lowest_crossing([0.5, 1.0, 2.0], [0.2, 0.8, 1.0], target=0.9)
    assert c.bound == "interpolated"
    assert c.value == pytest.approx(1.5)
    assert lowest_crossing([0.5, 1.0], [0.95, 1.0], 0.9).bound == "upper_bound"
    assert lowest_crossing([0.5, 1.0], [0.1, 0.2], 0.9).value is None


def test_crossing_rejects_mismatched_points():
    with pytest.raises(ValueError):
        highest_crossing([1, 2], [0.5], 0.9)
    assert not math.isnan(highest_crossing([1], [1.0], 0.9).value)
