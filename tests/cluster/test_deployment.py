import os

import pytest

from distserve.cluster import messages as m
from distserve.cluster.deployment import Deployment, PhaseSettings
from distserve.config import EngineConfig
from distserve.cluster.messages import MigrationTicket
from distserve.request import SamplingParams


def test_phase_settings_override_the_base_config():
    base = EngineConfig(max_num_seqs=64, kv_cache_memory_gib=1.0)
    d = Deployment(base, "disaggregated",
                   prefill=PhaseSettings(2, num_threads=1, max_num_batched_tokens=512),
                   decode=PhaseSettings(1, max_num_seqs=8, kv_cache_memory_gib=0.5), pin_cpus=False)
    roles = [(s.role, s.instance_id) for s in d.specs]
    assert roles == [("prefill", "prefill-0"), ("prefill", "prefill-1"), ("decode", "decode-0")]
    assert d.specs[0].config.max_num_batched_tokens == 512 and d.specs[0].config.max_num_seqs == 64
    assert d.specs[2].config.max_num_seqs == 8 and d.specs[2].config.kv_cache_memory_gib == 0.5
    assert all(s.config.num_threads == 1 and s.devices == [] for s in d.specs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="disaggregated", prefill=PhaseSettings(1)), "decode"),
    (dict(mode="colocated", colocated=PhaseSettings(0)), "colocated"),
    (dict(mode="mixed"), "mode"),
    (dict(mode="colocated", colocated=PhaseSettings(1), transfer="rdma"), "rdma"),
])
def test_bad_deployments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Deployment(EngineConfig(), **kwargs)


def test_messages_round_trip_signed_and_reject_other_bytes():
    ticket = MigrationTicket("r1", [1, 2, 3], 7, "hi", -0.5, [4, 9], 1.0, 1.5)
    msg = m.AddMigration(ticket, SamplingParams(temperature=0, stop=["\n"]), "prefill-0",
                         {"backend": "shm", "shm_name": "x"})
    ours, theirs = m.Sealer.new(), m.Sealer.new()
    assert ours.open_for_instance(ours.seal(msg)) == msg
    with pytest.raises(m.BadFrame, match="unauthenticated"):
        ours.open_for_instance(theirs.seal(msg))           # another deployment's secret
    frame = bytearray(ours.seal(msg))
    frame[-1] ^= 1
    with pytest.raises(m.BadFrame, match="unauthenticated"):
        ours.open_for_instance(bytes(frame))               # one bit changed on the way
    with pytest.raises(m.BadFrame, match="undecodable"):
        ours.open_for_instance(ours.seal(m.Stats("i", "decode", 0, 0, 0, 0.0, 1, 1)))
    import pickle
    for stray in (pickle.dumps({"not": "allowed"}), b"", b"\x00"):
        with pytest.raises(m.BadFrame):
            ours.open_for_controller(stray)
    with pytest.raises(ValueError, match="16 bytes"):
        m.Sealer(b"short")


def test_a_replayed_or_misdirected_frame_is_refused():
    """A frame seen on the wire and sent again is refused (each sender's frames are numbered);
    so is one sealed for an earlier incarnation of its receiver (an instance that restarted
    has a new nonce); frames of several senders, each in order, all pass."""
    import threading

    secret = b"s" * 32
    controller = m.Sealer(secret)
    instance = m.Sealer(secret, nonce=b"incarnation-2")
    command = controller.seal(m.Abort("r1"), to=b"incarnation-2")
    assert instance.open_for_instance(command) == m.Abort("r1")
    with pytest.raises(m.BadFrame, match="replayed"):
        instance.open_for_instance(command)
    with pytest.raises(m.BadFrame, match="unauthenticated"):   # meant for the last incarnation
        instance.open_for_instance(controller.seal(m.Abort("r2"), to=b"incarnation-1"))
    frames = {}

    def send(name):   # one sender per thread, as an instance's main and heartbeat threads
        frames[name] = [instance.seal(m.Heartbeat(name)) for _ in range(3)]
    threads = [threading.Thread(target=send, args=(n,)) for n in ("main", "beats")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(frames["main"], frames["beats"]):          # interleaved: both in order
        assert controller.open_for_controller(a).instance_id == "main"
        assert controller.open_for_controller(b).instance_id == "beats"
    with pytest.raises(m.BadFrame, match="replayed"):
        controller.open_for_controller(frames["main"][1])     # older than the last taken


def test_serve_runs_its_engine_in_its_own_process_by_default():
    """In the server's process the engine's thread shares the interpreter lock with the HTTP
    loop; `--instances 0` still asks for that."""
    import os

    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args

    def deployment(*flags):
        args = build_parser().parse_args(["serve", *flags])
        return deployment_from_args(args, engine_config_from_args(args, None))

    default = deployment()
    assert default.mode == "colocated" and [s.role for s in default.specs] == ["colocated"]
    assert default.specs[0].config.num_threads == len(os.sched_getaffinity(0))
    assert deployment("--num-threads", "1").specs[0].config.num_threads == 1
    assert deployment("--instances", "0") is None
    two = deployment("--instances", "2", "--no-pin-cpus")
    assert [s.config.num_threads for s in two.specs] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    with pytest.raises(ValueError, match="--instances"):
        deployment("--instances", "-1")


def test_parallel_flags_give_each_phase_its_workers_and_their_cores():
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args

    def deployment(*flags):
        args = build_parser().parse_args(["serve", *flags])
        return deployment_from_args(args, engine_config_from_args(args, None))

    dep = deployment("--prefill-instances", "1", "--decode-instances", "1", "--prefill-tp", "2",
                     "--decode-pp", "2", "--num-threads", "1", "--no-pin-cpus")
    assert [(s.role, s.tp, s.pp) for s in dep.specs] == [("prefill", 2, 1), ("decode", 1, 2)]
    colocated = deployment("--tp", "2", "--no-pin-cpus")
    assert [(s.tp, s.pp) for s in colocated.specs] == [(2, 1)]
    # the cores are shared by the instance's workers, one thread each on a 2-core machine
    cores = len(os.sched_getaffinity(0))
    assert colocated.specs[0].config.num_threads == max(1, cores // 2)
    pinned = deployment("--tp", "2", "--num-threads", "1")
    from distserve.cluster.deployment import usable_cores
    # both workers' cores pinned, or none where the machine has too few
    assert len(pinned.specs[0].devices) == (2 if len(usable_cores()) >= 2 else 0)
    with pytest.raises(ValueError, match="--prefill-tp"):
        deployment("--prefill-tp", "2")
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        deployment("--tp", "0")


def test_the_default_kv_budget_fits_the_machine_with_all_instances_counted():
    from distserve.cluster.deployment import default_kv_budget_gib
    gib = 2 ** 30
    assert default_kv_budget_gib(3, 24 * gib) == 2.0           # plenty: the default
    assert default_kv_budget_gib(3, 6 * gib) == 1.0            # 3 x 1 GiB = half of 6 GiB
    assert default_kv_budget_gib(4, 1 * gib) == 0.12           # a small machine: much less
    assert default_kv_budget_gib(1000, gib) == 0.05            # never nothing
    assert default_kv_budget_gib(2, None) == 2.0               # no /proc/meminfo: the default


def test_the_kv_in_use_is_what_the_engine_allocates_for_full_batches_of_full_requests():
    import torch

    from distserve.cluster.deployment import kv_in_use_gib
    from distserve.kv.cache import KVCacheShape
    from distserve.planner.models import MODELS
    smollm2 = MODELS["HuggingFaceTB/SmolLM2-135M"]   # 30 layers, 3 KV heads of 64
    engine_block = KVCacheShape(30, 3, 64, 16).bytes_per_block(torch.bfloat16)
    assert engine_block == 16 * smollm2.kv_bytes_per_token == 16 * 23040
    gib = kv_in_use_gib(16, 2048, 16, smollm2.kv_bytes_per_token)
    assert gib == 0.71   # 16 x (128 + 1 slack) blocks of 360 KiB = 0.709 GiB, rounded up
    blocks = KVCacheShape(30, 3, 64, 16).num_blocks_for(int(gib * 2 ** 30), torch.bfloat16)
    assert 16 * 129 <= blocks < 16 * 129 + 30   # all 16 fit, and little more
    assert kv_in_use_gib(1, 8192, 16, smollm2.kv_bytes_per_token) == 0.18   # one full request
    assert kv_in_use_gib(256, 8192, 16, smollm2.kv_bytes_per_token) > 2   # the defaults


def serve_budgets(monkeypatch, capsys, *flags, available_gib=64):
    """{instance id: KV GiB} and the notes of `distserve serve FLAGS` on a machine with
    `available_gib` free (and no GPU: the KV of --dtype auto reckoned in float32)."""
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server import kv_budget
    from distserve.server.cli import _fit_kv_to_memory, deployment_from_args
    monkeypatch.setattr(kv_budget, "available_memory_bytes", lambda: available_gib * 2 ** 30)
    args = build_parser().parse_args(["serve", "--device", "cpu", "--no-pin-cpus", *flags])
    config = engine_config_from_args(args, args.model)
    config, deployment = _fit_kv_to_memory(args, config, deployment_from_args(args, config))
    notes = capsys.readouterr().out.splitlines()
    if deployment is None:
        return {"in-process": config.kv_cache_memory_gib}, notes
    return {s.instance_id: s.config.kv_cache_memory_gib for s in deployment.specs}, notes


def test_the_default_kv_budget_of_an_instance_that_decodes_stops_at_what_it_can_use(
        monkeypatch, capsys):
    one_p_one_d = ["--prefill-instances", "1", "--decode-instances", "1"]
    # the defaults (256 requests of 8192 tokens of SmolLM2) can use more than 2 GiB
    assert serve_budgets(monkeypatch, capsys, *one_p_one_d) == (
        {"prefill-0": 2.0, "decode-0": 2.0}, [])
    budgets, notes = serve_budgets(monkeypatch, capsys, *one_p_one_d, "--max-model-len", "2048",
                                   "--decode-max-num-seqs", "16")
    assert budgets == {"prefill-0": 2.0, "decode-0": 1.42}   # 0.71 GiB in bfloat16, doubled
    assert notes == ["note: KV cache 1.42 GiB per decode instance, not 2: all that 16 requests "
                     "(--max-num-seqs) of 2048 tokens (--max-model-len) of the built-in "
                     "SmolLM2-135M can hold in float32; --kv-cache-memory sets it"]
    assert serve_budgets(monkeypatch, capsys, *one_p_one_d, "--max-model-len", "2048",
                         "--decode-max-num-seqs", "16", "--dtype", "bfloat16")[0]["decode-0"] == 0.71
    # a phase's own budget stays as given, and a switchable decode instance (serve --adapt)
    # keeps the prefill share, since it may turn prefill
    assert serve_budgets(monkeypatch, capsys, *one_p_one_d, "--max-model-len", "2048",
                         "--decode-max-num-seqs", "16", "--decode-kv-cache-memory", "1.5")[0] == {
        "prefill-0": 2.0, "decode-0": 1.5}
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args
    from distserve.server.kv_budget import fit_default_kv
    args = build_parser().parse_args(["serve", "--device", "cpu", "--no-pin-cpus", *one_p_one_d,
                                      "--max-model-len", "2048", "--decode-max-num-seqs", "16"])
    config = engine_config_from_args(args, None)
    switchable = deployment_from_args(args, config)
    assert switchable.make_switchable() == []
    _, switchable = fit_default_kv(args, config, switchable, rebuild=None)
    assert [s.config.kv_cache_memory_gib for s in switchable.specs] == [2.0, 2.0]
    # colocated instances, in their processes or in the server's, decode too
    assert serve_budgets(monkeypatch, capsys, "--instances", "2", "--max-num-seqs", "4",
                         "--max-model-len", "1024")[0] == {"colocated-0": 0.18, "colocated-1": 0.18}
    assert serve_budgets(monkeypatch, capsys, "--instances", "0", "--max-num-seqs", "4",
                         "--max-model-len", "1024")[0] == {"in-process": 0.18}
    # with little memory the memory rule cuts first, and the cap still applies under it
    budgets, notes = serve_budgets(monkeypatch, capsys, *one_p_one_d, "--max-model-len", "2048",
                                   "--decode-max-num-seqs", "16", available_gib=2)
    assert budgets == {"prefill-0": 0.5, "decode-0": 0.5} and len(notes) == 1


def test_the_ray_launcher_flags_move_kv_over_tcp_and_pin_nothing_here():
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import deployment_from_args
    args = build_parser().parse_args(["serve", "--launcher", "ray", "--prefill-instances", "1",
                                      "--decode-instances", "1"])
    dep = deployment_from_args(args, engine_config_from_args(args, None))
    assert dep.transfer == "tcp" and all(s.devices == [] for s in dep.specs)
    args = build_parser().parse_args(["serve", "--launcher", "ray", "--instances", "0"])
    with pytest.raises(ValueError, match="--instances 0"):
        deployment_from_args(args, engine_config_from_args(args, None))


def test_without_ray_the_ray_launcher_says_how_to_get_it(monkeypatch):
    import sys
    from distserve.cluster.ray_launcher import import_ray
    monkeypatch.setitem(sys.modules, "ray", None)   # Ray is installed here: hide it
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[ray\]"'):
        import_ray()


def test_on_a_gpu_node_each_worker_gets_a_cuda_device(monkeypatch):
    from distserve.cluster.deployment import visible_device_ids
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")   # what a GPU node's scheduler sets
    base = EngineConfig(device="cuda")
    d = Deployment(base, "disaggregated",
                   prefill=PhaseSettings(1, tensor_parallel_size=2), decode=PhaseSettings(1))
    assert [s.devices for s in d.specs] == [[0, 1], [2]]
    assert visible_device_ids(d.specs[0].devices) == ["4", "5"]   # the instance's own view
    with pytest.raises(ValueError, match="3 visible CUDA devices"):
        Deployment(base, "disaggregated", prefill=PhaseSettings(2, tensor_parallel_size=2),
                   decode=PhaseSettings(1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = Deployment(base, "colocated", colocated=PhaseSettings(1), pin_cpus=False)
    assert cpu.specs[0].devices == []                             # no GPU: nothing dealt
