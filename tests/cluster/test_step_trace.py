"""The instances' step trace: what the simulator-vs-reality check reads to tell a wrong
latency model from time the simulator does not model."""
import json

from distserve.cluster.step_trace import ENV, StepTrace
from distserve.config import EngineConfig
from distserve.engine.engine import Engine
from distserve.request import SamplingParams


def test_the_trace_is_off_unless_asked_for(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    assert StepTrace.from_env("prefill-0") is None
    monkeypatch.setenv(ENV, str(tmp_path / "traces"))
    trace = StepTrace.from_env("prefill-0")
    trace.received("r1", 12.5, 7)
    trace.sent(["r1"])
    trace.close()
    lines = [json.loads(x) for x in (tmp_path / "traces" / "prefill-0.jsonl").read_text().splitlines()]
    assert [x["ev"] for x in lines] == ["recv", "sent"]
    assert lines[0]["id"] == "r1" and lines[0]["arrival"] == 12.5 and lines[0]["prompt"] == 7
    assert lines[1]["ids"] == ["r1"] and lines[1]["t"] >= lines[0]["t"]


def test_every_model_step_is_recorded_with_its_shapes(tiny_llama, tmp_path):
    engine = Engine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=32,
                                          num_threads=1))
    trace = StepTrace(tmp_path / "colocated-0.jsonl")
    engine.executor.worker.runner.on_step = trace.step
    prompts = {"a": list(range(3, 8)), "b": list(range(3, 23))}   # 5 and 20 tokens
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, ids in prompts.items():
        engine.add(ids, params, request_id=rid)
    while engine.has_unfinished:
        engine.step()
    trace.close()
    steps = [json.loads(x) for x in (tmp_path / "colocated-0.jsonl").read_text().splitlines()]
    assert all(s["ev"] == "step" and s["t0"] <= s["t1"] for s in steps)
    assert all(a["t1"] <= b["t0"] for a, b in zip(steps, steps[1:]))
    prefilled = {}
    for s in steps:
        for rid, n, ctx in s["prefill"]:
            prefilled[rid] = prefilled.get(rid, 0) + n
            assert ctx == prefilled[rid]     # the context after the chunk
    assert prefilled == {rid: len(ids) for rid, ids in prompts.items()}
    decodes = [s["decode"] for s in steps if s["decode"]]
    # 4 tokens each: the first from the prefill, three decode steps with growing contexts
    assert decodes == [[6, 21], [7, 22], [8, 23]]
