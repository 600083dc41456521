"""A deployment on a Ray cluster: two simulated nodes on this machine (ray.cluster_utils),
a 1 prefill + 1 decode plan with one instance on each node, KV over TCP, greedy output equal
to transformers, every block freed."""
from __future__ import annotations

import asyncio

import pytest

from distserve import SamplingParams
from distserve.cluster.deployment import Deployment
from distserve.config import EngineConfig
from distserve.controller import Controller
from distserve.planner.plan import PhasePlan, Plan
from helpers.reference import transformers_greedy

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from distserve.cluster.ray_launcher import RayLauncher  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["Hello, my name is", "The river that runs through the old city has carried boats"]


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "resources": {"rack_a": 1}})
    cluster.add_node(num_cpus=1, resources={"rack_b": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _plan(model) -> Plan:
    return Plan(model=str(model), hardware="cpu", nodes=2, gpus_per_node=1, workload="test",
                ttft_slo=1.0, tpot_slo=0.1, attainment_target=0.9, algorithm="high",
                prefill=PhasePlan(1, 1, 1), decode=PhasePlan(1, 1, 1), goodput=1.0,
                goodput_per_gpu=0.5,
                placement=[{"instance": "prefill-0", "stage": 0, "node": 0, "gpus": [0]},
                           {"instance": "decode-0", "stage": 0, "node": 1, "gpus": [0]}])


def test_a_plan_for_two_nodes_serves_on_two_ray_nodes(two_nodes, tiny_llama):
    expected = transformers_greedy(tiny_llama, PROMPTS, 16)

    base = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64, num_threads=1)
    deployment = Deployment.from_plan(_plan(tiny_llama), base, transfer="tcp", launcher="ray")
    assert deployment.warnings == [] and deployment.nodes == {0, 1}
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    async def collect(c, prompt, rid):
        toks = []
        async for out in await c.generate(prompt, greedy, rid):
            toks += out.new_token_ids
            last = out
        return toks, last

    async def until(condition, timeout):
        for _ in range(int(timeout / 0.1)):
            if condition():
                return
            await asyncio.sleep(0.1)
        raise AssertionError("timed out")

    async def run():
        launcher = RayLauncher(deployment.specs, host="127.0.0.1")
        c = Controller(deployment.specs, str(tiny_llama), launcher, transfer="tcp")
        await c.start()
        try:
            where = {iid: inst.process.node_id for iid, inst in c.instances.items()}
            results = await asyncio.gather(*[collect(c, p, f"r{i}")
                                             for i, p in enumerate(PROMPTS)])
            # the decode instance's actor dies: the supervisor starts it again in its bundle
            ray.kill(c.instances["decode-0"].process.actor)
            await until(lambda: c.counts()["instance_restarts"] == 1, 60)
            await until(lambda: c.health()["status"] == "ok", 120)
            where["decode-0 again"] = c.instances["decode-0"].process.node_id
            results.append(await collect(c, PROMPTS[0], "after"))
            for _ in range(200):
                stats = c.instance_stats()
                if all(s.num_free_blocks == s.num_blocks for s in stats):
                    break
                await asyncio.sleep(0.05)
            return where, results, stats
        finally:
            await c.shutdown()

    where, results, stats = asyncio.run(asyncio.wait_for(run(), 300))
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert where["prefill-0"] != where["decode-0"]           # one instance on each node
    assert "rack_a" in nodes[where["prefill-0"]]             # plan node 0 is the head
    assert where["decode-0 again"] == where["decode-0"]      # restarted where the plan put it
    for (toks, last), exp in zip(results, expected + expected[:1]):
        assert toks == exp
        assert last.extra["kv_transfer_bytes"] > 0           # the KV crossed between nodes
    assert all(s.num_free_blocks == s.num_blocks for s in stats)
    assert ray.util.placement_group_table() == {} or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())


def test_a_plan_for_more_nodes_than_the_cluster_has_is_refused(two_nodes, tiny_llama):
    plan = _plan(tiny_llama)
    plan.placement[1]["node"] = 2
    deployment = Deployment.from_plan(plan, EngineConfig(model=str(tiny_llama)),
                                      transfer="tcp", launcher="ray")
    with pytest.raises(ValueError, match="3 nodes; the Ray cluster has 2"):
        RayLauncher(deployment.specs)
