"""The drift detector: silent on a steady workload, fires on a real shift only after the
checks in a row it asks for, and its tests' p-values are the textbook ones."""
import math

import numpy as np
import pytest

from distserve.planner.drift import DriftDetector, binomial_below_pvalue, ks_pvalue, ks_statistic
from distserve.planner.workload import Lengths


def batches(spec: str, count: int, size: int = 100, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [Lengths(spec).sample(size, rng) for _ in range(count)]


def test_a_steady_workload_never_drifts():
    det = DriftDetector(Lengths("sharegpt"), min_requests=100, consecutive=3)
    checks = [det.check(i, o) for i, o in batches("sharegpt", 40)]
    assert not any(c.drifted for c in checks)
    assert max(c.streak for c in checks) < 3
    assert min(min(c.input_pvalue, c.output_pvalue) for c in checks) > 1e-3


def test_a_shift_drifts_after_the_checks_in_a_row_and_not_before():
    det = DriftDetector(Lengths("sharegpt"), min_requests=100, consecutive=3)
    checks = [det.check(i, o) for i, o in batches("longbench", 4)]
    assert [c.streak for c in checks] == [1, 2, 3, 4]
    assert [c.drifted for c in checks] == [False, False, True, True]
    assert "input" in checks[0].rejected
    assert checks[0].observed["input_mean"] > 1.5 * checks[0].planned["input_mean"]


def test_one_bad_batch_among_good_ones_is_not_a_drift():
    det = DriftDetector(Lengths("sharegpt"), min_requests=100, consecutive=2)
    good, bad = batches("sharegpt", 6), batches("longbench", 3)
    order = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3]]
    assert not any(det.check(i, o).drifted for i, o in order)


def test_too_few_requests_say_nothing():
    det = DriftDetector(Lengths("sharegpt"), min_requests=100, consecutive=1)
    i, o = batches("longbench", 1, size=99)[0]
    check = det.check(i, o)
    assert not check.drifted and check.rejected == [] and check.input_pvalue == 1.0


def test_attainment_below_the_prediction_is_a_drift_and_within_it_is_not():
    det = DriftDetector(Lengths("fixed:100:10"), min_requests=100, consecutive=1)
    lens = (np.full(100, 100), np.full(100, 10))
    assert "attainment" in det.check(*lens, attained=60, predicted_attainment=0.95).rejected
    assert det.check(*lens, attained=93, predicted_attainment=0.95).rejected == []
    assert det.check(*lens, attained=100, predicted_attainment=0.95).rejected == []


def test_pvalues_are_the_textbook_ones():
    # Kolmogorov's distribution: Q(1.0) = 0.26999967 (the limit as both samples grow)
    lam = 1.0
    n = 10**12
    d = lam / (math.sqrt(n / 2) + 0.12 + 0.11 / math.sqrt(n / 2))
    assert ks_pvalue(d, n, n) == pytest.approx(0.2699997, rel=1e-4)
    assert ks_statistic(np.array([1, 2, 3]), np.array([1, 2, 3])) == 0.0
    assert ks_statistic(np.array([1, 2]), np.array([5, 6])) == 1.0
    # P(X <= 1) for Binomial(10, 0.5) = 11 / 1024
    assert binomial_below_pvalue(1, 10, 0.5) == pytest.approx(11 / 1024)
    assert binomial_below_pvalue(10, 10, 1.0) == 1.0 and binomial_below_pvalue(9, 10, 1.0) == 0.0


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="alpha"):
        DriftDetector(Lengths("sharegpt"), alpha=1.5)
    with pytest.raises(ValueError, match="min_requests"):
        DriftDetector(Lengths("sharegpt"), min_requests=3)
