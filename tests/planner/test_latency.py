"""The fitted (artifact) latency model and the calibrated roofline, against hand-computed values."""
import dataclasses
import json
import os

import numpy as np
import pytest

from distserve.planner.hardware import get_hardware
from distserve.planner.latency import PP_STAGE_MS, instance_latency
from distserve.planner.models import get_model
from distserve.planner.profiles import BUILTIN_PROFILES, Profile, fit_decode, fit_prefill, load_profile
from distserve.planner.roofline import calibrate, physical_terms, relative_error, roofline_entry

SHARED = "/work/shared/reference/a100-profiles/profiler-a100-80g.distserve.json"


def test_fitted_prefill_and_decode_by_hand():
    e = load_profile("distserve").get("facebook/opt-13b", 1)
    a, b, c = 18.10254647486372, 0.1019122572698738, 7.122264314252114e-06
    assert e.prefill_ms([100, 200]) == pytest.approx(a + b * 300 + c * (100 ** 2 + 200 ** 2))
    # decode: a + b * sum(ctx + 1) + c * batch, small-batch fit below 95, large from 95 on
    a, b, c = 19.934702624895458, 0.0006269356524350583, 0.03850697740828398
    assert e.decode_ms([10, 20, 30]) == pytest.approx(a + b * (11 + 21 + 31) + c * 3)
    a, b, c = 7.1661889468253595, 0.0005798000403396046, 0.15831096191764046
    assert e.decode_ms([100] * 95) == pytest.approx(a + b * 101 * 95 + c * 95)


def test_pipeline_parallel_forms_interleaved():
    """The artifact's pipeline: a batch in every stage, PP decode micro-batches side by side."""
    e = load_profile("distserve").get("facebook/opt-66b", 4)
    lat = instance_latency(get_model("opt-66b"), 4, 2, schedule="interleaved")
    ms = e.prefill_ms([512])
    assert lat.prefill_stage(512, 512 ** 2) == pytest.approx((ms / 2 + PP_STAGE_MS * 2) * 1e-3)
    assert lat.prefill([512]) == pytest.approx(2 * (ms / 2 + PP_STAGE_MS * 2) * 1e-3)
    assert lat.prefill_busy(1, 512, 512 ** 2) == pytest.approx(lat.prefill_stage(512, 512 ** 2))
    # a decode micro-batch spends decode_ms / p in each of the p stages
    assert lat.decode([300] * 8) == pytest.approx(e.decode_ms([300] * 8) * 1e-3)
    assert lat.source == "profile" and (lat.tp, lat.pp) == (4, 2) and lat.lanes == 2


def test_pipeline_parallel_forms_synchronous():
    """Our engine's pipeline, by hand: m = min(PP, rows) micro-batches; the first through every
    stage, each other one a slowest-stage time behind, (m + p - 2) handovers."""
    from distserve.planner.profiles import PipelineCost
    e = load_profile("distserve").get("facebook/opt-66b", 4)
    lat = instance_latency(get_model("opt-66b"), 4, 2)   # even stages, free handovers
    assert lat.schedule == "synchronous" and lat.lanes == 1
    a, b, c = e.prefill
    assert lat.prefill([512]) == pytest.approx(e.prefill_ms([512]) * 1e-3)   # one micro-batch
    var = b * 1024 + c * 2 * 512 ** 2
    assert lat.prefill([512, 512]) == pytest.approx((a + var / 2) * 1.5 * 1e-3)
    assert lat.prefill_busy(2, 1024, 2 * 512 ** 2) == lat.prefill([512, 512])
    da, db, dc = e.decode_small
    ctx = [300] * 8
    assert lat.decode(ctx) == pytest.approx((da * 1.5 + (db * 301 * 8 + dc * 8) * 1.5 / 2) * 1e-3)
    measured = dataclasses.replace(lat, decode_pipe=PipelineCost(1.2, 3.0, 0.5))
    one = da + (db * 301 * 8 + dc * 8) / 2
    assert measured.decode(ctx) == pytest.approx((one * (1 + 1.2 / 2) + 2 * (3.0 + 0.5 * 4)) * 1e-3)
    # PP 4 with 2 requests: 2 micro-batches, 4 handovers
    four = dataclasses.replace(measured, pp=4)
    one = da + (db * 301 * 2 + dc * 2) / 2
    assert four.decode([300] * 2) == pytest.approx((one * (1 + 1.2 / 4) + 4 * (3.0 + 0.5)) * 1e-3)
    with pytest.raises(ValueError, match="interleaved"):
        instance_latency(get_model("opt-66b"), 4, 2, schedule="gpipe")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="shared reference data not mounted")
def test_artifact_file_loads_as_is_and_matches_the_packaged_copy():
    assert Profile.load(SHARED).entries == load_profile("distserve").entries
    with open(BUILTIN_PROFILES["vllm"]) as f:
        raw = json.load(f)
    assert load_profile("vllm").to_dict() == raw


def test_profile_round_trip_and_errors(tmp_path):
    p = load_profile("vllm")
    path = tmp_path / "p.json"
    Profile(p.entries, {"_hardware": "h200"}).save(str(path))
    q = Profile.load(str(path))
    assert q.entries == p.entries and q.hardware == "h200"
    with pytest.raises(FileNotFoundError, match="distserve, vllm"):
        Profile.load(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="decoding_smallbs"):
        Profile.from_dict({"m": {"1": {"prefill": [1, 2, 3]}}})


def test_fits_recover_exact_coefficients():
    rng = np.random.default_rng(0)
    batches = [list(rng.integers(1, 2000, rng.integers(1, 5))) for _ in range(30)]
    times = [3.0 + 0.1 * sum(x) + 2e-5 * sum(v * v for v in x) for x in batches]
    assert fit_prefill(batches, times) == pytest.approx((3.0, 0.1, 2e-5), rel=1e-6)
    ctxs = [list(rng.integers(1, 2000, rng.integers(1, 90))) for _ in range(30)]
    times = [7.0 + 1e-3 * sum(c + 1 for c in x) + 0.05 * len(x) for x in ctxs]
    assert fit_decode(ctxs, times) == pytest.approx((7.0, 1e-3, 0.05), rel=1e-6)


def test_roofline_physical_terms_by_hand():
    m, hw = get_model("opt-13b"), get_hardware("a100-80g")
    t = physical_terms(m, hw, 2)
    assert t["mem"] == pytest.approx(m.params * 2 / 2 / 2039e9 * 1e3)
    assert t["gemm"] == pytest.approx((2 * m.layers * m.layer_params + 2 * 5120 * 50272) / 2 / 312e12 * 1e3)
    assert t["attn"] == pytest.approx(2 * 40 * 5120 / 2 / 312e12 * 1e3)
    assert t["kv"] == pytest.approx(2 * 40 * 5120 * 2 / 2 / 2039e9 * 1e3)
    assert t["comm"] == pytest.approx(40 * 2 * 2 * 0.5 * 5120 * 2 / 300e9 * 1e3)
    assert physical_terms(m, hw, 1)["comm"] == 0.0


def test_roofline_coefficients_are_theta_times_terms():
    m, hw = get_model("opt-175b"), get_hardware("a100-80g")
    th, t = calibrate("distserve"), physical_terms(m, hw, 8)
    e = roofline_entry(m, hw, 8)
    assert e.prefill[0] == pytest.approx(th["prefill"][0] * t["layers"] + th["prefill"][1] * t["mem"])
    assert e.prefill[1] == pytest.approx(th["prefill"][2] * t["gemm"] + th["prefill"][3] * t["comm"])
    assert e.prefill[2] == pytest.approx(th["prefill"][4] * t["attn"])
    assert e.decode_small[1] == pytest.approx(th["small"][2] * t["kv"])
    assert min(e.prefill + e.decode_small + e.decode_large) >= 0


def test_calibrated_roofline_tracks_the_profiles():
    hw, prof = get_hardware("a100-80g"), load_profile("distserve")
    for name, tps in prof.entries.items():
        for tp, entry in tps.items():
            err = relative_error(roofline_entry(get_model(name), hw, tp), entry)
            assert err["prefill"] < 0.10 and err["small"] < 0.10 and err["large"] < 0.25, (name, tp, err)


def test_roofline_fills_in_what_the_profile_lacks():
    lat = instance_latency(get_model("opt-175b"), 8, 1)
    assert lat.source == "roofline"
    faster = instance_latency(get_model("opt-175b"), 8, 1, hardware=get_hardware("l40s"))
    assert faster.source == "roofline" and faster.prefill([1024]) > lat.prefill([1024])
    # Hopper: the roofline with the factors fitted on the measured Hopper table
    hopper = instance_latency(get_model("opt-175b"), 8, 1, hardware=get_hardware("h100-80g"))
    assert "hopper factors" in hopper.source and hopper.prefill([1024]) < lat.prefill([1024])
    # more TP, less time per token; a model with a profile but other hardware: roofline
    assert instance_latency(get_model("opt-175b"), 4, 1).entry.prefill[1] > lat.entry.prefill[1]
    assert instance_latency(get_model("opt-13b"), 1, 1,
                            hardware=get_hardware("h200")).source.startswith("roofline")
