"""What the reality check (benchmarks/sim_vs_real.py) needs from the planner: a decode form
for an engine that pads decode attention to the longest context, a profile fit that tells the
two forms apart and adds the engine's per-step overhead, and simulating an explicit trace
(the arrivals and lengths a real benchmark run sent)."""
import numpy as np
import pytest

from helpers.naive_decode import naive_decode

from distserve.planner.latency import InstanceLatency
from distserve.planner.profile_cli import fit_entry
from distserve.planner.profiles import Profile, ProfileEntry, context_term, fit_decode
from distserve.planner.search import _ZERO
from distserve.planner.simulator import Colocated, Disaggregated, InstanceConfig, simulate
from distserve.planner.workload import Trace

PADDED = ProfileEntry((10.0, 0.1, 1e-4), (20.0, 0.01, 0.5), (30.0, 0.02, 0.2), threshold=8,
                      decode_context="max")


def inst(entry=PADDED, capacity=10 ** 9, **kw):
    return InstanceConfig(InstanceLatency(entry), capacity, **kw)


def test_padded_decode_form_and_its_profile_round_trip():
    assert context_term([10, 20, 30]) == 11 + 21 + 31
    assert context_term([10, 20, 30], "max") == 3 * 31
    assert PADDED.decode_ms([10, 20, 30]) == pytest.approx(20 + 0.01 * 93 + 0.5 * 3)
    assert InstanceLatency(PADDED).decode([10, 20, 30]) == pytest.approx(PADDED.decode_ms([10, 20, 30]) * 1e-3)
    doc = {"m": {"1": PADDED.to_dict()}}
    assert doc["m"]["1"]["decoding_context"] == "max"
    assert Profile.from_dict(doc).get("m", 1) == PADDED
    # the artifact's files carry no such key: paged, and written back without it
    plain = ProfileEntry.from_dict({"prefill": [1, 2, 3], "decoding_smallbs": [1, 2, 3],
                                    "decoding_largebs": [1, 2, 3]})
    assert plain.decode_context == "sum" and "decoding_context" not in plain.to_dict()
    with pytest.raises(ValueError, match="decoding_context"):
        ProfileEntry((1, 2, 3), (1, 2, 3), (1, 2, 3), decode_context="mean")


def test_padded_closed_form_segments_match_step_by_step():
    rng = np.random.default_rng(5)
    n = 300
    arr = np.sort(rng.uniform(0, 20, n))
    ins, outs = rng.integers(10, 500, n), rng.integers(2, 120, n)
    entry = ProfileEntry((0, 0, 0), (20.0, 0.01, 0.5), (30.0, 0.02, 0.2), threshold=8, decode_context="max")
    r = simulate(Trace(arr, ins, outs), Disaggregated(_ZERO, inst(entry)))

    def coeffs(b):
        return tuple(x * 1e-3 for x in (entry.decode_small if b < 8 else entry.decode_large))
    finish = naive_decode(list(arr), list(ins), list(outs - 1), coeffs, padded=True)
    np.testing.assert_allclose(r.ttft + arr + r.tpot * (outs - 1), finish, rtol=1e-9, atol=1e-9)
    # padding costs more than paged attention when the contexts differ
    paged = ProfileEntry(entry.prefill, entry.decode_small, entry.decode_large, 8)
    r2 = simulate(Trace(arr, ins, outs), Disaggregated(_ZERO, inst(paged)))
    assert r2.tpot.mean() < r.tpot.mean()


def test_padded_colocated_by_hand():
    """A short request decoding beside a long one pays for the long one's context."""
    tr = Trace(np.array([0.0, 0.0]), np.array([1000, 10]), np.array([3, 3]))
    r = simulate(tr, Colocated(inst(max_num_batched_tokens=4096)))
    p1, p2 = ((10 + 0.1 * n + 1e-4 * n * n) * 1e-3 for n in (1000, 10))   # one prompt each
    steps = sum((20 + 0.01 * 2 * (1000 + g) + 0.5 * 2) * 1e-3 for g in (1, 2))
    assert r.ttft == pytest.approx([p1, p1 + p2])
    assert r.tpot == pytest.approx([(p2 + steps) / 2, steps / 2])


def test_profile_fit_tells_padded_from_paged_and_adds_the_step_overhead():
    prefill = [([n] * k, 5 + 0.02 * n * k + 1e-5 * k * n * n) for n in (16, 64, 256) for k in (1, 2)]
    shapes = [[c] * b for b in (1, 4, 16, 32) for c in (64, 512)] + [[64] * (b - 1) + [512] for b in (4, 16, 32)]
    padded = [(c, 4 + 1e-4 * len(c) * (max(c) + 1) + 0.03 * len(c)) for c in shapes]
    paged = [(c, 4 + 1e-4 * sum(x + 1 for x in c) + 0.03 * len(c)) for c in shapes]
    e, err = fit_entry(prefill, padded)
    assert e.decode_context == "max" and e.decode_small == pytest.approx((4, 1e-4, 0.03), rel=1e-6)
    assert err["decode"]["max"] < 1e-9
    e, _ = fit_entry(prefill, paged)
    assert e.decode_context == "sum" and e.decode_small == pytest.approx((4, 1e-4, 0.03), rel=1e-6)
    # uniform batches alone cannot tell: the artifact's form stays
    e, _ = fit_entry(prefill, [(c, t) for c, t in padded if min(c) == max(c)])
    assert e.decode_context == "sum"
    # overhead oa + oc * batch lands in decode a and c, and in prefill a as one prompt's
    e, err = fit_entry(prefill, padded, overhead=[(1, 0.6), (8, 1.3), (32, 3.7)])
    assert err["engine_overhead_ms"] == pytest.approx({"per_step": 0.5, "per_request": 0.1})
    assert e.decode_small == pytest.approx((4.5, 1e-4, 0.13), rel=1e-6)
    assert e.prefill == pytest.approx((5.6, 0.02, 1e-5), rel=1e-6)
    assert fit_decode([[1, 3], [5], [2, 2, 9]], [3.0, 2.0, 4.0], "max") != fit_decode(
        [[1, 3], [5], [2, 2, 9]], [3.0, 2.0, 4.0])


def test_an_explicit_trace_is_replayed_as_given():
    """Arrivals and lengths from a real run, unsorted by nothing: the simulator serves them
    FCFS, and the per-request results line up with the trace's order."""
    arr = np.array([0.0, 0.01, 0.5, 3.0])
    ins, outs = np.array([200, 50, 10, 100]), np.array([4, 2, 1, 30])
    dep = Disaggregated(inst(max_num_batched_tokens=100), inst())
    r = simulate(Trace(arr, ins, outs), dep)
    one = (10 + 0.1 * 200 + 1e-4 * 200 ** 2) * 1e-3
    assert r.ttft[0] == pytest.approx(one)                      # alone: over the budget
    two = (10 + 0.1 * 50 + 1e-4 * 50 ** 2) * 1e-3
    assert r.ttft[1] == pytest.approx(one - 0.01 + two)         # waits for the first
    assert r.tpot[2] == 0.0 and np.all(np.isfinite(r.ttft))


@pytest.mark.slow
def test_profile_cli_times_mixed_batches_and_the_engine_step(tiny_llama, tmp_path, capsys):
    import json

    import torch

    from distserve.planner.cli import main
    out = tmp_path / "prof.json"
    threads = torch.get_num_threads()
    args = ["profile", str(tiny_llama), "-o", str(out), "--device", "cpu", "--dtype", "float32",
            "--prefill-lens", "8,16,32", "--prefill-batches", "1", "--batch-sizes", "1,4,8",
            "--context-lens", "8,64", "--repeats", "1", "--name", "tiny", "--clock", "cpu"]
    try:
        assert main(args + ["--num-threads", "2"]) == 2          # CPU time of 2 threads: refused
        assert "--num-threads 1" in capsys.readouterr().err
        assert main(args + ["--num-threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "decode context term" in printed and "engine step overhead" in printed
    doc = json.loads(out.read_text())
    m = doc["_measurements"]["tiny"]
    assert [[8, 8, 8, 64], [8] * 7 + [64]] == [c for c, _ in m["decode"] if min(c) != max(c)]
    assert [b for b, _ in m["engine_overhead"]] == [1, 8] and all(ms > 0 for _, ms in m["engine_overhead"])
    assert doc["_clock"]["tiny"] == "cpu" and "engine_overhead_ms" in doc["_fit_error"]["tiny"]
    assert Profile.load(str(out)).get("tiny", 1).decode_context in ("sum", "max")
