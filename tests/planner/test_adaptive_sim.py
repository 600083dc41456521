"""The simulator's adaptive deployment (planner.simulator.adaptive): instances that change
role mid-run, moved by a check as `serve --adapt` moves them (real simulations)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from distserve.planner.adapt import Hysteresis, window_check
from distserve.planner.planning import planned_deployment
from distserve.planner.simulator import simulate
from distserve.planner.simulator import adaptive
from distserve.planner.simulator.adaptive import simulate_adaptive
from distserve.planner.workload import Lengths, Trace, make_trace

from tests.planner.test_adapt import PLAN, problem  # noqa: F401 (a fixture)


def mixed_trace(n=400, rate=4.0):
    return make_trace(Lengths("sharegpt-trace"), n, rate, seed=3)


def shifting_trace():
    """100 s of short prompts with long outputs at 8 req/s (a one-prefill split's work),
    then 200 s of 600-token prompts with 8-token outputs at 3 req/s (a three-prefill one's)."""
    a = make_trace(Lengths("fixed:16:400"), 800, 8.0, seed=1)
    b = make_trace(Lengths("fixed:600:8"), 600, 3.0, seed=2)
    trace = Trace(np.concatenate([a.arrival, max(100.0, a.arrival[-1]) + b.arrival]),
                  np.concatenate([a.input_len, b.input_len]),
                  np.concatenate([a.output_len, b.output_len]))
    return trace, len(a)


def test_a_deployment_that_never_moves_is_the_plain_simulation(problem):  # noqa: F811
    """Every check is asked what the server's would see (requests finished by then, arrivals
    so far); one that never moves leaves every request's TTFT and TPOT as without checks."""
    trace, dep = mixed_trace(), planned_deployment(problem, PLAN)
    seen = []

    def check(now, prefill, total, finished, arrivals):
        assert (finished[:, 0] <= now).all() and (arrivals <= now).all()
        seen.append((now, prefill, total, len(finished), len(arrivals)))
        return 0

    run = simulate_adaptive(trace, dep, check, interval_s=10.0)
    plain = simulate(trace, dep)
    assert run.switches == []
    np.testing.assert_array_equal(run.result.ttft, plain.ttft)
    np.testing.assert_array_equal(run.result.tpot, plain.tpot)
    assert [s[0] for s in seen] == [10.0 * (i + 1) for i in range(int(trace.arrival[-1] // 10))]
    assert all(p == 2 and t == 4 for _, p, t, _, _ in seen)
    assert [s[4] for s in seen] == [int((trace.arrival <= s[0]).sum()) for s in seen]
    assert seen[-1][3] > 0 and all(a[3] <= b[3] for a, b in zip(seen, seen[1:]))


class _Watched(adaptive._Adaptive):
    """The simulator's adaptive deployment, asserting the drain as it runs: no request goes
    to a draining instance, and one changes role only once it holds nothing."""
    def pick_prefill(self) -> int:
        i = super().pick_prefill()
        assert self.leaving[i] is None and self.role[i] == "prefill"
        return i

    def pick_decode(self) -> int:
        i = super().pick_decode()
        assert self.leaving[i] is None and self.role[i] == "decode"
        return i

    def other_event(self, now, kind, x, y) -> None:
        if kind == adaptive.SWITCHED:
            assert not self.pq[x] and not self.pbusy[x] and self.pkv[x] == 0
            assert self.dload[x] == 0 and self.dkv[x] == 0 and self.dactive[x] == 0
            self.switched_at.append(now)
        super().other_event(now, kind, x, y)


def test_a_moved_instance_drains_then_serves_in_its_new_role(problem, monkeypatch):  # noqa: F811
    """+1 once: the decode instance with the least work stops taking requests, finishes its
    own, and becomes the third prefill instance; later checks count 3 prefill instances and
    every request is still served."""
    trace, dep = mixed_trace(), planned_deployment(problem, PLAN)
    counts, switched_at = [], []
    monkeypatch.setattr(adaptive, "_Adaptive", _Watched)
    monkeypatch.setattr(_Watched, "switched_at", switched_at, raising=False)

    def check(now, prefill, total, finished, arrivals):
        counts.append(prefill)
        return 1 if len(counts) == 3 else 0

    run = simulate_adaptive(trace, dep, check, interval_s=10.0, switch_s=0.5)
    [switch] = run.switches
    assert switch.role == "prefill" and switch.instance in (2, 3)   # 0, 1 start as prefill
    assert switch.decided == 30.0 and switch.done >= switch.decided + 0.5
    assert switched_at == [switch.done]
    assert counts[:3] == [2, 2, 2] and set(counts[3:]) == {3}
    assert np.isfinite(run.result.ttft).all() and np.isfinite(run.result.tpot).all()
    # and back: the same instance may drain from prefill to decode
    calls = []

    def there_and_back(now, prefill, total, finished, arrivals):
        calls.append(now)
        return {3: 1, 8: -1}.get(len(calls), 0)
    run = simulate_adaptive(trace, dep, there_and_back, interval_s=10.0, switch_s=0.5)
    assert [s.role for s in run.switches] == ["prefill", "decode"]
    assert all(s.done >= s.decided + 0.5 for s in run.switches)
    assert np.isfinite(run.result.ttft).all() and np.isfinite(run.result.tpot).all()


def test_the_last_instance_of_a_role_never_moves(problem):  # noqa: F811
    trace = mixed_trace(200)
    dep = replace(planned_deployment(problem, PLAN), num_prefill=1, num_decode=1)
    run = simulate_adaptive(trace, dep, lambda *a: 1, interval_s=5.0)
    assert run.switches == []
    np.testing.assert_array_equal(run.result.ttft, simulate(trace, dep).ttft)
    with pytest.raises(ValueError, match="interval_s"):
        simulate_adaptive(trace, dep, lambda *a: 0, interval_s=0.0)
    two_workers = replace(dep.decode, latency=replace(dep.decode.latency, tp=2))
    with pytest.raises(ValueError, match="one-worker"):
        simulate_adaptive(trace, replace(dep, decode=two_workers), lambda *a: 0, interval_s=5.0)


def test_the_servers_check_follows_a_shift_the_static_split_cannot_serve(problem):  # noqa: F811
    """Start 1P3D, the split for long outputs; after the shift to long prompts, the server's
    check (its window, scoring and hysteresis) moves decode instances to prefill, toward the
    three-prefill split the new workload needs, and serves the second phase far better than
    the same split left as it was."""
    trace, n_first = shifting_trace()
    dep = replace(planned_deployment(problem, PLAN), num_prefill=1, num_decode=3)
    static = simulate(trace, dep)
    checks = []
    check = window_check(problem, PLAN, Hysteresis(cooldown_s=20.0), window_s=30.0,
                         min_observed=20, log=checks)
    run = simulate_adaptive(trace, dep, check, interval_s=10.0)
    assert [s.role for s in run.switches] == ["prefill", "prefill"]
    assert all(s.decided > 100.0 for s in run.switches)   # none before the shift
    assert checks[-1][1] == 3 and max(checks[-1][2], key=checks[-1][2].get) == 3

    def attainment(res, sent):
        ok = (res.ttft <= problem.slo.ttft) & (res.tpot <= problem.slo.tpot)
        return ok[sent].mean()
    first, last_min = np.arange(len(trace)) < n_first, trace.arrival >= 240.0
    assert attainment(run.result, first) == attainment(static, first) > 0.9
    # the backlog of the minute before the moves is served within the next minute
    assert attainment(static, last_min) < 0.1 < 0.9 < attainment(run.result, last_min)
    assert attainment(run.result, ~first) > 2 * attainment(static, ~first)
