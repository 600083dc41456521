"""The controller's health bookkeeping on a clock of our own (no sleeps): silence, back-off,
giving up, forgetting old failures, and what /health says; and the re-run's continuation."""
import pytest

from distserve.cluster.messages import RequestOutput
from distserve.cluster.recovery import Progress
from distserve.cluster.supervision import Supervisor
from distserve.request import SamplingParams


def _up(sup, now=0.0):
    for iid in sup.members:
        sup.ready(iid, now)


def test_silence_and_back_off_then_giving_up():
    sup = Supervisor({"p0": "prefill", "d0": "decode", "d1": "decode"}, max_restarts=3,
                     backoff_s=1.0, max_backoff_s=3.0, stable_s=100.0, heartbeat_timeout_s=1.5)
    _up(sup)
    sup.beat("p0", 1.0)
    sup.beat("d1", 1.0)
    assert sup.silent(2.0) == ["d0"]                    # 2 s without a beat
    sup.down("d0", 2.0, "silent")
    assert sup.health() == {"status": "degraded", "missing": ["d0"],
                            "instances": {"p0": "up", "d0": "down", "d1": "up"}}
    delays = []
    now = 2.0
    for _ in range(3):                                 # restart, die again before stable_s
        due = min(t for t in (now + k * 0.5 for k in range(20)) if sup.restarts_due(t))
        delays.append(due - now)
        sup.restarting("d0", due)
        sup.ready("d0", due)
        now = due + 1.0
        sup.down("d0", now, "died")
    assert delays == [1.0, 2.0, 3.0]                   # doubling, capped at max_backoff_s
    assert sup.members["d0"].state == "gave_up" and not sup.restarts_due(now + 100)
    assert sup.num_restarts == 3 and sup.num_failures == 4
    sup.down("d1", now, "died")
    assert sup.health()["status"] == "down"            # no decode instance left


def test_a_stable_instance_forgets_its_failures_and_a_late_start_is_found():
    sup = Supervisor({"c0": "colocated"}, backoff_s=1.0, stable_s=10.0, ready_timeout_s=5.0)
    _up(sup)
    sup.down("c0", 1.0, "died")
    sup.restarting("c0", 2.0)
    assert not sup.late_starts(6.9) and sup.late_starts(7.1) == ["c0"]
    sup.ready("c0", 7.0)
    sup.beat("c0", 18.0)                               # up for 11 s > stable_s
    sup.down("c0", 19.0, "died")
    assert sup.members["c0"].restart_at == pytest.approx(20.0)   # back to the first back-off


def test_the_continuation_asks_for_the_rest_and_reads_as_one_request():
    progress = Progress([5, 6, 7], arrival_time=100.0)
    progress.seen(RequestOutput("r", [11, 12], "ab", False, num_prompt_tokens=3,
                                num_output_tokens=2, arrival_time=100.0, first_token_time=100.5))
    ids, params, resume = progress.continuation(SamplingParams(temperature=0, max_tokens=10))
    assert ids == [5, 6, 7, 11, 12] and params.max_tokens == 8
    assert (resume.num_tokens, resume.emitted_chars) == (2, 2)   # outputs, and text sent
    out = progress.seen(RequestOutput("r", [13], "c", False, num_prompt_tokens=5, num_output_tokens=1,
                                      arrival_time=104.0, first_token_time=104.2))
    assert (out.num_prompt_tokens, out.num_output_tokens) == (3, 3)
    assert (out.arrival_time, out.first_token_time) == (100.0, 100.5)
    assert progress.continuation(SamplingParams(max_tokens=3)) is None   # all 3 are out
    _, unbounded, _ = Progress([1], 0.0).continuation(SamplingParams(max_tokens=None))
    assert unbounded.max_tokens is None
