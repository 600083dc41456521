"""`plan`, `simulate` and `profile` from the command line: documents, files and clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from distserve.planner.cli import main
from distserve.planner.plan import Plan
from distserve.planner.profile_cli import fit_entry
from distserve.planner.profiles import ProfileEntry, fit_decode

SHARED = "/work/shared/reference/a100-profiles/profiler-a100-80g.distserve.json"
FAST = ["--num-requests", "300", "--seeds", "2", "--jobs", "1"]


def test_the_issue_example(capsys, tmp_path):
    profile = SHARED if os.path.exists(SHARED) else "distserve"
    out = tmp_path / "plan.yaml"
    rc = main(["plan", "--model", "facebook/opt-13b", "--hardware", "a100-80g", "--latency-profile", profile,
               "--workload", "sharegpt", "--ttft-slo", "0.2", "--tpot-slo", "0.1", "--nodes", "1",
               "--gpus-per-node", "4", "--algorithm", "low", "--json", "-o", str(out), *FAST])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("prefill", "decode", "goodput_per_gpu", "num_gpus", "placement", "candidates", "verdict"):
        assert key in doc
    assert doc["prefill"]["tp"] == 2 and doc["num_gpus"] <= 4 and doc["goodput_per_gpu"] > 0
    assert Plan.load(str(out)).to_dict() == doc


def test_plan_text_report(capsys):
    assert main(["plan", "--model", "opt-13b", "--ttft-slo", "0.25", "--tpot-slo", "0.1",
                 "--gpus-per-node", "4", "--colocated-profile", "vllm", *FAST]) == 0
    text = capsys.readouterr().out
    assert "predicted goodput" in text and "verdict:" in text and "Candidates considered" in text


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt-9"], "known models: facebook/opt-13b"),
    (["--model", "opt-13b", "--hardware", "tpu"], "known hardware: a100-80g"),
    (["--model", "opt-175b", "--gpus-per-node", "2"], "fits no (TP, PP)"),
    (["--model", "opt-13b", "--ttft-slo", "0.005"], "loosen the SLOs"),
    (["--model", "opt-13b", "--workload", "nope"], "unknown workload"),
    (["--model", "opt-13b", "--latency-profile", "/nonexistent.json"], "not found"),
    (["--model", "opt-13b", "--ttft-slo", "1000"], "looks like milliseconds"),
    (["--model", "opt-13b", "--tpot-slo", "20"], "--tpot-slo 0.02 for 20 ms"),
    (["--model", "opt-13b", "--workload", "fixed:4000:500"], "longer than facebook/opt-13b's context"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    args = ["plan", "--ttft-slo", "0.2", "--tpot-slo", "0.1", *FAST, *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_simulate_rates_goodput_and_a_plan(capsys, tmp_path):
    assert main(["simulate", "--model", "opt-13b", "--ttft-slo", "0.2", "--tpot-slo", "0.1",
                 "--prefill-tp", "2", "--rate", "2", "6", "--goodput", "--json",
                 "--per-request", str(tmp_path / "r.csv"), *FAST]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "arrival,input_len,output_len,ttft,tpot" and len(rows) == 301
    assert doc["rates"][0]["attainment"] > doc["rates"][1]["attainment"]
    assert doc["num_gpus"] == 3 and doc["goodput"]["per_gpu"] > 0
    assert main(["simulate", "--model", "opt-13b", "--ttft-slo", "0.25", "--tpot-slo", "0.1", "--mode",
                 "colocated", "--latency-profile", "vllm", "--chunked-prefill", "--rate", "1", *FAST]) == 0
    assert "attainment" in capsys.readouterr().out
    plan = tmp_path / "p.json"
    assert main(["plan", "--model", "opt-13b", "--ttft-slo", "0.2", "--tpot-slo", "0.1", "--gpus-per-node", "4",
                 "--no-compare", "-o", str(plan), *FAST]) == 0
    capsys.readouterr()
    assert main(["simulate", "--model", "opt-13b", "--ttft-slo", "0.2", "--tpot-slo", "0.1", "--plan",
                 str(plan), "--rate", "1", "--json", *FAST]) == 0
    assert json.loads(capsys.readouterr().out)["num_gpus"] == Plan.load(str(plan)).num_gpus
    assert main(["simulate", "--model", "opt-13b", "--ttft-slo", "0.2", "--tpot-slo", "0.1", *FAST]) == 2
    assert "--rate" in capsys.readouterr().err


def test_planner_imports_no_torch():
    code = ("import distserve.planner.cli, distserve.planner.planning, distserve.planner.report, "
            "distserve.planner.roofline, distserve.planner.profile_cli; "
            "from distserve.planner.cli import main; import sys; "
            "assert main(['plan', '--model', 'opt-13b', '--ttft-slo', '0.2', '--tpot-slo', '0.1', "
            "'--gpus-per-node', '2', '--num-requests', '100', '--seeds', '1', '--jobs', '1', "
            "'--no-compare', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_profile_fit_and_its_error():
    prefill = [([n] * k, 5 + 0.02 * n * k + 1e-5 * k * n * n) for n in (16, 64, 256) for k in (1, 2)]
    decode = [([c] * b, 4 + 1e-4 * b * (c + 1) + 0.03 * b) for b in (1, 8, 32, 96, 128, 160) for c in (64, 512)]
    entry, errors = fit_entry(prefill, decode)
    assert entry.prefill == pytest.approx((5, 0.02, 1e-5), rel=1e-6)
    assert entry.decode_small == pytest.approx((4, 1e-4, 0.03), rel=1e-6)
    assert errors["prefill"]["max"] < 1e-9 and errors["decode"]["max"] < 1e-9
    with pytest.raises(ValueError, match="at least 3"):
        fit_entry(prefill[:2], decode)


@pytest.mark.slow
def test_profile_measures_the_engine(tiny_llama, tmp_path, capsys):
    out = tmp_path / "prof.json"
    assert main(["profile", str(tiny_llama), "-o", str(out), "--device", "cpu", "--dtype", "float32",
                 "--prefill-lens", "8,16,32", "--prefill-batches", "1,2", "--batch-sizes", "1,2,4",
                 "--context-lens", "8,32", "--repeats", "1", "--name", "tiny"]) == 0
    assert "fit error" in capsys.readouterr().out
    doc = json.load(open(out))
    assert doc["_hardware"] == "cpu" and set(doc["tiny"]["1"]) >= {"prefill", "decoding_smallbs"}
    assert doc["_transfer"]["backend"] == "shm" and doc["_transfer"]["bytes_per_s"] > 0
    from distserve.planner.profiles import Profile
    assert Profile.load(str(out)).get("tiny", 1) is not None


def test_profile_fit_finds_the_batch_where_decode_turns_compute_bound():
    """A step that streams the weights costs the same up to some batch, then grows with it:
    two pieces split at a measured batch size fit it, one line does not."""
    prefill = [([n] * k, 5 + 0.02 * n * k + 1e-5 * k * n * n) for n in (16, 64, 256) for k in (1, 2)]

    def step(ctxs):   # flat (memory-bound) below 16 requests, 0.8 ms per request from there on
        b = len(ctxs)
        return 10 + 2e-3 * sum(c + 1 for c in ctxs) + (0.8 * b - 2.0 if b >= 16 else 0.05 * b)

    decode = [([c] * b, step([c] * b)) for b in (1, 2, 4, 8, 16, 32, 64) for c in (64, 256, 512)]
    entry, errors = fit_entry(prefill, decode)
    assert entry.threshold == 16 and errors["decode_threshold"] == 16
    assert entry.decode_small == pytest.approx((10, 2e-3, 0.05), rel=1e-6)
    assert entry.decode_large == pytest.approx((8, 2e-3, 0.8), rel=1e-6)
    assert errors["decode"]["max"] < 1e-9
    line = fit_decode([c for c, _ in decode], [t for _, t in decode])   # one piece instead
    assert max(abs(ProfileEntry(entry.prefill, line, line).decode_ms(c) / t - 1) for c, t in decode) > 0.1


def test_speedup_from_measurements():
    from distserve.planner.profile_cli import speedup
    base = {"prefill": [([64], 10.0), ([128], 20.0), ([64, 64], 21.0)],
            "decode": [([32], 4.0), ([32, 32], 5.0), ([32] * 4, 7.0), ([8, 32], 5.0)]}
    tp2 = {"prefill": [([64], 6.0), ([128], 10.0)], "decode": [([32], 2.0), ([32, 32], 4.0)]}
    assert speedup(base["prefill"], tp2["prefill"]) == pytest.approx(np.median([10 / 6, 2.0]))
    assert speedup(base["decode"], tp2["decode"]) == pytest.approx(np.median([2.0, 1.25]))


def test_pipeline_fit_recovers_the_synchronous_pipeline_cost():
    """PP step times made from known costs (slowest stage, handovers) are fitted back to them,
    and the fit's error on its own measurements is ~0; a phase with no shape measured both
    ways is an error naming the PP degree."""
    from distserve.planner.latency import InstanceLatency
    from distserve.planner.profiles import PipelineCost
    from distserve.planner.profile_cli import pipeline_errors, pipeline_fit
    from distserve.planner.profiles import ProfileEntry
    entry = ProfileEntry((5.0, 0.1, 1e-5), (3.0, 0.001, 0.2), (3.0, 0.001, 0.2), threshold=95)
    truth = {"prefill": PipelineCost(1.3, 2.0, 0.01), "decode": PipelineCost(1.1, 0.5, 0.3)}
    lat = InstanceLatency(entry, 1, 2, prefill_pipe=truth["prefill"], decode_pipe=truth["decode"])
    prefill_shapes = [[64], [256], [64, 64], [256, 256], [128] * 4]
    decode_shapes = [[100], [100] * 2, [100] * 8, [400] * 16, [50] * 32]
    base = {"prefill": [(x, entry.prefill_ms(x)) for x in prefill_shapes],
            "decode": [(x, entry.decode_ms(x)) for x in decode_shapes]}
    pp2 = {"prefill": [(x, lat.prefill(x) * 1e3) for x in prefill_shapes],
           "decode": [(x, lat.decode(x) * 1e3) for x in decode_shapes]}
    fit = pipeline_fit(entry, base, pp2, 2)
    for phase, cost in truth.items():
        assert fit[phase]["bottleneck"] == pytest.approx(cost.bottleneck, rel=1e-3)
        assert fit[phase]["hop_ms"] == pytest.approx(cost.hop_ms, rel=1e-3)
        assert fit[phase]["hop_ms_per_token"] == pytest.approx(cost.hop_ms_per_token, rel=1e-3)
    assert max(e["max"] for e in pipeline_errors(entry, base, pp2, 2, fit).values()) < 1e-6
    # one-prompt shapes only: the handovers are fitted, the stages taken as even
    single = pipeline_fit(entry, {"prefill": base["prefill"][:2], "decode": base["decode"][:1]},
                          {"prefill": pp2["prefill"][:2], "decode": pp2["decode"][:1]}, 2)
    assert single["prefill"]["bottleneck"] == 1.0
    with pytest.raises(ValueError, match="PP 2"):
        pipeline_fit(entry, base, {"prefill": [([64, 64, 64], 5.0)], "decode": pp2["decode"]}, 2)


@pytest.mark.slow
def test_profile_measures_tp_and_pp_instances_and_the_planner_uses_them(tiny_llama, tmp_path,
                                                                        capsys):
    import dataclasses

    from distserve.planner.latency import instance_latency
    from distserve.planner.profiles import PipelineCost

    from distserve.planner.models import from_config_json
    from distserve.planner.profiles import Profile
    out = tmp_path / "prof.json"
    assert main(["profile", str(tiny_llama), "-o", str(out), "--device", "cpu", "--dtype", "float32",
                 "--prefill-lens", "8,16,32", "--prefill-batches", "1,2", "--batch-sizes", "1,2,4",
                 "--context-lens", "8,32", "--repeats", "1", "--name", "tiny", "--num-threads", "1",
                 "--tp", "1,2", "--pp", "1,2", "--no-engine-overhead"]) == 0
    text = capsys.readouterr().out
    assert "TP 2 x PP 1: speed-up K" in text and "PP 2 decode: slowest stage" in text
    doc = json.load(open(out))
    assert set(doc["tiny"]) == {"1", "2"}
    assert set(doc["_speedup"]["tiny"]) == {"tp2", "pp2"}
    assert all(k > 0 for v in doc["_speedup"]["tiny"].values() for k in v.values())
    fit = doc["_pipeline"]["tiny"]["2"]
    profile = Profile.load(str(out))
    model = dataclasses.replace(from_config_json(str(tiny_llama)), name="tiny")
    tp2 = instance_latency(model, 2, 1, profile)
    assert tp2.source == "profile" and tp2.entry == profile.get("tiny", 2)   # measured, not roofline
    pp2 = instance_latency(model, 1, 2, profile)
    assert pp2.decode_pipe == PipelineCost(**{k: fit["decode"][k] for k in
                                              ("bottleneck", "hop_ms", "hop_ms_per_token")})
    assert pp2.prefill_pipe.to_dict() == {k: fit["prefill"][k] for k in pp2.prefill_pipe.to_dict()}
    assert fit["error"]["decode"]["mean"] >= 0
    # without a measurement: even stages, free handovers
    assert instance_latency(model, 1, 4, profile).decode_pipe == PipelineCost()


def test_profile_measures_the_kv_pull_and_the_planner_takes_it_as_the_link(tmp_path):
    """`distserve profile` times a KV pull over the real backend (shared memory here); a plan
    made from that profile on its hardware uses it as the link between instances."""
    import torch

    from distserve.planner.cli import measured_link
    from distserve.planner.hardware import Cluster, get_hardware
    from distserve.planner.profile_engine import measure_kv_pull
    cache = torch.zeros(40, 2, 2, 16, 2, 16, dtype=torch.bfloat16)
    t = measure_kv_pull(cache, repeats=3)
    assert t["backend"] == "shm" and t["bytes"] == 32 * cache[0].nbytes and t["bytes_per_s"] > 0
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"_hardware": "cpu", "_transfer": t}))
    cpu = Cluster(get_hardware("cpu"), 1, 2)
    assert measured_link(cpu, str(profile)).link(True) == t["bytes_per_s"]
    h100 = Cluster(get_hardware("h100-80g"), 1, 8)   # made on another machine: the table's
    assert measured_link(h100, str(profile)).link(True) == get_hardware("h100-80g").link_bandwidth


def test_plan_piped_into_head_ends_quietly():
    """Progress goes to stderr, the plan to stdout; a reader that stops early is no error."""
    import subprocess
    import sys
    cmd = (f"{sys.executable} -m distserve.cli plan --model facebook/opt-13b --ttft-slo 0.25 "
           "--tpot-slo 0.1 --gpus-per-node 2 --num-requests 100 --seeds 1 -j 1 | head -1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Plan: facebook/opt-13b") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "search" in done.stderr.lower()
