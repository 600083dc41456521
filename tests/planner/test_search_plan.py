"""The search never breaks a constraint; plans place, round-trip and become serve's deployment."""
import pytest

from distserve.planner.goodput import SLO
from distserve.planner.hardware import Cluster, get_hardware
from distserve.planner.memory import kv_capacity_tokens
from distserve.planner.models import get_model
from distserve.planner.plan import PhasePlan, Plan, place
from distserve.planner.planning import make_plan
from distserve.planner.search import Problem

CASES = [  # model, nodes, GPUs per node, algorithm, workload, TTFT, TPOT
    ("facebook/opt-13b", 1, 4, "low", "sharegpt", 0.25, 0.1),
    ("facebook/opt-13b", 1, 4, "high", "sharegpt", 0.25, 0.1),
    ("facebook/opt-66b", 2, 8, "low", "humaneval", 0.125, 0.2),
    ("facebook/opt-66b", 1, 8, "high", "longbench", 15.0, 0.15),
    ("meta-llama/Llama-2-70b-hf", 1, 8, "low", "sharegpt", 1.0, 0.1),
    ("Qwen/Qwen2.5-7B", 2, 4, "high", "fixed:512:64", 0.5, 0.05),
    ("facebook/opt-66b", 2, 8, "whole", "humaneval", 0.125, 0.2),
    ("Qwen/Qwen2.5-7B", 2, 4, "whole", "fixed:512:64", 0.5, 0.05),
]


def problem(model, nodes, gpn, workload="sharegpt", ttft=0.25, tpot=0.1, **kw):
    from distserve.planner.workload import Lengths
    kw.setdefault("requests", 300)
    kw.setdefault("seeds", (0,))
    kw.setdefault("jobs", 1)
    return Problem(get_model(model), Cluster(get_hardware("a100-80g"), nodes, gpn), Lengths(workload),
                   SLO(ttft, tpot), **kw)


@pytest.mark.parametrize("model,nodes,gpn,algorithm,workload,ttft,tpot", CASES)
def test_plans_respect_every_constraint(model, nodes, gpn, algorithm, workload, ttft, tpot):
    p = problem(model, nodes, gpn, workload, ttft, tpot, colocated_profile="vllm")
    plan = make_plan(p, algorithm, workload)
    m, hw = p.model, p.hw
    for ph in (plan.prefill, plan.decode):
        assert m.heads % ph.tp == 0 and m.layers % ph.pp == 0 and ph.tp <= gpn
        assert kv_capacity_tokens(m, hw, ph.tp, ph.pp) >= p.min_kv_tokens
    assert plan.num_gpus <= nodes * gpn and plan.goodput_per_gpu > 0
    used = [(x["node"], g) for x in plan.placement for g in x["gpus"]]
    assert len(used) == len(set(used)) == plan.num_gpus              # no GPU twice
    for x in plan.placement:
        phase = plan.prefill if x["instance"].startswith("prefill") else plan.decode
        assert len(x["gpus"]) == phase.tp                              # a TP group in one node
    if algorithm == "low":                                             # pairs share their nodes
        for u in range(plan.prefill.instances):
            assert _nodes_of(plan, f"prefill-{u}") == _nodes_of(plan, f"decode-{u}")
    assert plan.verdict and plan.colocated is not None and plan.candidates


def _nodes_of(plan, name):
    return {x["node"] for x in plan.placement if x["instance"] == name}


def test_target_rate_sets_the_instance_counts():
    p = problem("facebook/opt-13b", 1, 8, rate=8.0, requests=200)
    plan = make_plan(p, "high", compare=False)
    assert plan.goodput >= 8.0 * 0.8   # the joint simulation may land a little under the phase bound
    small = make_plan(problem("facebook/opt-13b", 1, 8, rate=2.0, requests=200), "high", compare=False)
    assert small.num_gpus < plan.num_gpus


def test_impossible_problems_say_why():
    with pytest.raises(ValueError, match="fits no .TP, PP. on 1 x a100-80g"):
        make_plan(problem("facebook/opt-175b", 1, 1))
    with pytest.raises(ValueError, match="loosen the SLOs"):
        make_plan(problem("facebook/opt-13b", 1, 4, ttft=0.01, tpot=0.1), compare=False)
    with pytest.raises(ValueError, match="needs .* GPUs"):
        make_plan(problem("facebook/opt-13b", 1, 4, rate=500.0), "low", compare=False)


def test_placement_low_affinity_keeps_stage_pairs_together():
    out = place(3, 8, PhasePlan(3, 3, 1), PhasePlan(4, 3, 1), segments=3, paired=True)
    for stage in range(3):
        nodes = {x["node"] for x in out if x["stage"] == stage}
        assert len(nodes) == 1
    assert len({x["node"] for x in out}) == 3
    with pytest.raises(ValueError, match="cannot hold"):
        place(1, 4, PhasePlan(4, 1, 1), PhasePlan(1, 1, 1))


def _plan() -> Plan:
    return Plan("facebook/opt-13b", "a100-80g", 1, 4, "sharegpt", 0.2, 0.1, 0.9, "low",
                PhasePlan(2, 1, 1, max_num_batched_tokens=4096), PhasePlan(1, 1, 2, max_num_seqs=128),
                5.0, 1.25, 0.05, place(1, 4, PhasePlan(2, 1, 1), PhasePlan(1, 1, 2)),
                {"tp": 1, "pp": 1, "goodput_per_gpu": 0.5}, "disaggregate", [{"x": 1}])


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_plan_file_round_trips(tmp_path, suffix):
    plan = _plan()
    path = tmp_path / f"plan.{suffix}"
    plan.save(str(path))
    again = Plan.load(str(path))
    assert again == plan and again.num_gpus == 4 and again.to_dict()["num_gpus"] == 4
    for key in ("prefill", "decode", "goodput_per_gpu", "num_gpus", "placement"):
        assert key in again.to_dict()


def test_bad_plan_files(tmp_path):
    d = _plan().to_dict()
    with pytest.raises(ValueError, match="unknown plan fields: bogus"):
        Plan.from_dict({**d, "bogus": 1})
    d.pop("decode")
    with pytest.raises(ValueError, match="plan lacks: decode"):
        Plan.from_dict(d)


def test_plan_becomes_serves_deployment():
    from distserve.cluster.deployment import Deployment
    from distserve.config import EngineConfig
    plan = _plan()
    dep = Deployment.from_plan(plan, EngineConfig(), pin_cpus=False)
    assert (dep.ttft_slo, dep.tpot_slo) == (plan.ttft_slo, plan.tpot_slo)
    # what this machine cannot honour is named, never dropped silently
    assert any(f"made for {plan.hardware}" in w for w in dep.warnings)
    # the plan's parallelism is deployed as planned, phase by phase
    for s in dep.specs:
        phase = getattr(plan, s.role)
        assert (s.tp, s.pp) == (phase.tp, phase.pp)
    assert not any("TP" in w for w in dep.warnings)
    roles = [s.role for s in dep.specs]
    assert roles.count("prefill") == 1 and roles.count("decode") == 2
    assert dep.prefill.max_num_batched_tokens == 4096 and dep.decode.max_num_seqs == 128
    prefill_spec = next(s for s in dep.specs if s.role == "prefill")
    assert prefill_spec.config.max_num_batched_tokens == 4096


def test_serve_plan_flag_deploys_the_plan_file(tmp_path):
    """`distserve serve --plan plan.yaml` reads the file into the deployment it starts."""
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args
    path = tmp_path / "plan.yaml"
    _plan().save(str(path))
    refused = build_parser().parse_args(["serve", "--plan", str(path)])
    with pytest.raises(ValueError, match="made for facebook/opt-13b; this serves the built-in"):
        deployment_from_args(refused, engine_config_from_args(refused, None))
    args = build_parser().parse_args(["serve", "--plan", str(path), "--no-pin-cpus", "--transfer",
                                      "tcp", "--ignore-plan-model"])
    dep = deployment_from_args(args, engine_config_from_args(args, None))
    assert any("made for facebook/opt-13b" in w for w in dep.warnings)
    assert [s.role for s in dep.specs] == ["prefill", "decode", "decode"]
    assert dep.transfer == "tcp" and dep.specs[0].config.max_num_batched_tokens == 4096
    from distserve.server.cli import slo_from_args
    slo = slo_from_args(args, dep)  # the plan's SLOs are the server's defaults
    assert (slo.ttft_slo, slo.tpot_slo) == (_plan().ttft_slo, _plan().tpot_slo)
    given = build_parser().parse_args(["serve", "--plan", str(path), "--ttft-slo", "9",
                                       "--tpot-slo", "8", "--ignore-plan-model"])
    assert slo_from_args(given, dep).ttft_slo == 9
    bad = build_parser().parse_args(["serve", "--plan", str(path), "--instances", "2"])
    with pytest.raises(ValueError, match="--plan sets the deployment"):
        deployment_from_args(bad, engine_config_from_args(bad, None))


def test_a_colocated_verdict_deploys_colocated_instances(tmp_path, tiny_llama):
    """The verdict is what `serve --plan` deploys: a plan that says stay colocated starts its
    colocated replicas, with their TP and PP, for the model it was made for."""
    import dataclasses

    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args
    plan = dataclasses.replace(_plan(), model=str(tiny_llama), hardware="cpu", mode="colocated",
                               colocated={"tp": 2, "pp": 1, "instances": 2,
                                          "goodput_per_gpu": 0.6})
    path = tmp_path / "plan.yaml"
    plan.save(str(path))
    assert Plan.load(str(path)).mode == "colocated"
    args = build_parser().parse_args(["serve", str(tiny_llama), "--plan", str(path),
                                      "--no-pin-cpus"])
    dep = deployment_from_args(args, engine_config_from_args(args, str(tiny_llama)))
    assert dep.mode == "colocated" and [s.role for s in dep.specs] == ["colocated"] * 2
    assert all((s.tp, s.pp) == (2, 1) for s in dep.specs) and dep.warnings == []
    with pytest.raises(ValueError, match="needs its 'colocated' deployment"):
        dataclasses.replace(plan, colocated=None)


def test_a_verdict_names_the_mode():
    from distserve.planner.plan import verdict_mode
    assert verdict_mode("stay colocated: TP 2 gives 1.3x") == "colocated"
    assert verdict_mode("disaggregate: 2.36x the per-GPU goodput") == "disaggregated"
    assert verdict_mode("either: disaggregation is within 5%") == "disaggregated"
