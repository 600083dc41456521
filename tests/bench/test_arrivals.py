import math

import numpy as np
import pytest

from distserve.bench.arrivals import arrival_offsets


def test_poisson_mean_rate_and_seeding():
    offsets = arrival_offsets(4000, rate=5.0, seed=1)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential: CV 1
    assert offsets == arrival_offsets(4000, rate=5.0, seed=1)
    assert offsets != arrival_offsets(4000, rate=5.0, seed=2)


def test_burstiness_keeps_the_rate_and_changes_the_spread():
    gaps = np.diff(arrival_offsets(4000, rate=2.0, burstiness=0.25, seed=0))
    assert gaps.mean() == pytest.approx(0.5, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)  # gamma shape k: CV 1/sqrt(k)


def test_inf_sends_everything_at_once():
    assert arrival_offsets(3, rate=math.inf) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("rate,burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_bad_values(rate, burstiness):
    with pytest.raises(ValueError):
        arrival_offsets(3, rate=rate, burstiness=burstiness)
