import pytest

from distserve.server.slo import SLOWindow


def test_attainment_and_goodput_over_the_window():
    w = SLOWindow(ttft_slo=0.5, tpot_slo=0.1, window_s=10.0)
    w._started = 0.0
    w.record(0.2, 0.05, now=1.0)   # both met
    w.record(0.9, 0.05, now=2.0)   # TTFT missed
    w.record(0.2, 0.30, now=3.0)   # TPOT missed
    w.record(0.5, 0.10, now=4.0)   # exactly at both SLOs: met
    snap = w.snapshot(now=5.0)
    assert snap["requests"] == 4
    assert snap["attainment"] == pytest.approx(0.5)
    assert snap["ttft_attainment"] == pytest.approx(0.75)
    assert snap["tpot_attainment"] == pytest.approx(0.75)
    assert snap["goodput"] == pytest.approx(2 / 5.0)  # 2 good requests over 5 s so far
    later = w.snapshot(now=12.5)  # the first two requests left the 10 s window
    assert later["requests"] == 2 and later["attainment"] == pytest.approx(0.5)
    assert later["goodput"] == pytest.approx(1 / 10.0)


def test_bad_slos_are_refused():
    with pytest.raises(ValueError, match="SLOs"):
        SLOWindow(0, 0.1)
    with pytest.raises(ValueError, match="window"):
        SLOWindow(1, 0.1, window_s=0)
