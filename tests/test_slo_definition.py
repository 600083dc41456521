"""The one SLO rule (distserve.slo): what attains, what a failed request counts as, and that
the per-request and the array forms agree; the benchmark, the simulator and the live window
all answer with it."""
import math

import numpy as np
import pytest

from distserve import slo
from distserve.bench.metrics import RequestRecord, attainment as bench_attainment
from distserve.planner.simulator import SimResult
from distserve.server.slo import SLOWindow

CASES = [  # (ttft, tpot) -> (ttft ok, tpot ok) under SLOs 1.0 / 0.1
    ((0.5, 0.05), (True, True)), ((1.0, 0.1), (True, True)), ((1.5, 0.05), (False, True)),
    ((0.5, 0.2), (True, False)), ((None, None), (False, False)), ((math.inf, 0.0), (False, True)),
    ((0.5, math.nan), (True, False)),
]


@pytest.mark.parametrize("latencies,expected", CASES)
def test_one_request(latencies, expected):
    assert slo.meets(*latencies, 1.0, 0.1) == expected
    assert slo.meets(*latencies, None, None) == tuple(x is not None and math.isfinite(x) for x in latencies)


def test_the_array_form_counts_what_the_request_form_says():
    ttft, tpot = [c[0][0] for c in CASES], [c[0][1] for c in CASES]
    flags = [e for _, e in CASES]
    n = len(CASES)
    expected = (sum(a and b for a, b in flags) / n, sum(a for a, _ in flags) / n, sum(b for _, b in flags) / n)
    assert slo.attainment(ttft, tpot, 1.0, 0.1) == pytest.approx(expected)
    assert slo.attainment([], [], 1.0, 0.1) is None


def test_every_consumer_answers_with_it():
    ttft = [0.5, 1.0, 1.5, 0.5]
    tpot = [0.05, 0.1, 0.05, 0.2]
    both = slo.attainment(ttft, tpot, 1.0, 0.1)[0]
    assert both == 0.5
    assert SimResult(np.array(ttft), np.array(tpot)).attainment(1.0, 0.1) == both
    records = [RequestRecord(10, 3, True, output_len=3, ttft=a, last_token_time=a + 2 * b)
               for a, b in zip(ttft, tpot)]
    assert bench_attainment(records, 1.0, 0.1)[0] == pytest.approx(both)
    window = SLOWindow(1.0, 0.1)
    for a, b in zip(ttft, tpot):
        window.record(a, b)
    assert window.snapshot()["attainment"] == both
