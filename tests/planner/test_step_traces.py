"""Reading the instances' step traces: what distserve/cluster/step_trace.py writes is what
distserve.planner.step_traces reads, window by window, phase by phase."""
import time
from types import SimpleNamespace

from distserve.cluster.step_trace import StepTrace
from distserve.planner.profiles import ProfileEntry
from distserve.planner.step_traces import read_traces, summarise

ENTRY = ProfileEntry((10.0, 0.1, 0.0), (20.0, 0.0, 0.5), (20.0, 0.0, 0.5))


def test_the_reader_reads_what_the_instances_write_within_the_window(tmp_path):
    start = time.monotonic()
    prefill, decode = StepTrace(tmp_path / "prefill-0.jsonl"), StepTrace(tmp_path / "decode-0.jsonl")
    prefill.step(start - 100, start - 99.9, [(SimpleNamespace(request_id="old", num_computed_tokens=0), 8)], [])
    prefill.received("a", start, 8)
    t = time.monotonic()
    prefill.step(t, t + 0.01, [(SimpleNamespace(request_id="a", num_computed_tokens=0), 8)], [])
    prefill.sent(["a"])
    decode.step(t + 0.02, t + 0.03, [], [SimpleNamespace(num_tokens=9), SimpleNamespace(num_tokens=12)])
    for trace in (prefill, decode):
        trace.close()
    traces = read_traces(tmp_path, start, t + 1)
    assert set(traces) == {"prefill-0", "decode-0"}
    assert [r["ev"] for r in traces["prefill-0"]] == ["recv", "step", "sent"]   # the old step is outside
    summary = summarise(traces, ENTRY, 1.0)
    assert (summary["prefill-0"]["prefill_steps"], summary["prefill-0"]["decode_steps"]) == (1, 0)
    assert summary["prefill-0"]["first_tokens"] == 1   # its prompt completed in that step
    assert (summary["decode-0"]["prefill_steps"], summary["decode-0"]["decode_steps"]) == (0, 1)
    assert summary["decode-0"]["first_tokens"] == 0
