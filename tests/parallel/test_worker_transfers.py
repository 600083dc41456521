"""Every worker of a parallel instance moves its own share of the KV: a prefill instance's
workers each export theirs (one tcp server each), a decode instance's workers each pull the
regions they own, and a pull that fails on a worker fails that pull, not the instance."""
from __future__ import annotations

import multiprocessing

import msgspec
import pytest
import torch

from distserve.config import EngineConfig
from distserve.engine.parallel_executor import ParallelExecutor
from distserve.kv.cache import KVCacheShape
from distserve.transfer import InstanceEndpoint, TransferError, make_puller, make_source
from distserve.transfer.shares import KVLink

pytestmark = pytest.mark.slow
SECRET = b"a test deployment secret, fixed"  # the same in the spawned child
BLOCKS = 8


def _executor(model, tp, pp, export):
    config = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=BLOCKS, device="cpu",
                          tensor_parallel_size=tp, pipeline_parallel_size=pp, num_threads=1)
    return ParallelExecutor(config, kv_link=KVLink("tcp", SECRET, export=export))


def _full_kv() -> torch.Tensor:
    """What the prefill instance holds: blocks x layers x K/V x tokens x KV heads x head dim."""
    torch.manual_seed(0)
    return torch.randn(BLOCKS, 2, 2, 16, 2, 16)


def _prefill_instance(model, endpoints, done) -> None:
    """A TP 2 prefill instance in a process of its own (one instance per process, as in a
    deployment), its workers' shares holding _full_kv()."""
    prefill = _executor(model, 2, 1, export=True)
    full = _full_kv()
    for head, segment in enumerate(prefill._segments):      # what each worker serves
        segment.cache.copy_(full[:, :, :, :, head:head + 1])
    endpoints.put(msgspec.to_builtins(InstanceEndpoint(prefill.kv_endpoints)))
    done.wait(120)
    prefill.close()


def test_each_worker_exports_and_pulls_its_own_share(tiny_llama):
    # tiny_llama: 2 layers x 2 KV heads; TP 2 splits the heads, PP 2 the layers
    ctx = multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_prefill_instance, args=(tiny_llama, queue, done))
    child.start()
    decode = puller = None
    try:
        source = msgspec.convert(queue.get(timeout=120), InstanceEndpoint)
        assert len({ep.port for ep in source.shards}) == 2      # a server per worker
        assert [(ep.layer_start, ep.head_start, ep.num_kv_heads) for ep in source.shards] == \
            [(0, 0, 1), (0, 1, 1)]
        decode = _executor(tiny_llama, 1, 2, export=False)
        puller = make_puller("tcp", timeout=5, secret=SECRET)
        for segment in decode._segments:
            segment.cache.zero_()   # the warm-up steps wrote some blocks

        # a source that is gone: the pull fails, every worker stays in step
        shape = KVCacheShape(2, 2, 16, 16)
        _, stale = make_source("tcp", shape, BLOCKS, torch.float32, secret=SECRET)
        stale.close()
        with pytest.raises(TransferError):
            decode.pull_kv(puller, InstanceEndpoint([stale.endpoint]), [1], [2])

        full = _full_kv()
        stats = decode.pull_kv(puller, source, [3, 5], [6, 0])
        assert stats.nbytes == 2 * full[0].numel() * 4          # the blocks' KV, once
        for layer, segment in enumerate(decode._segments):      # each stage got its layer
            for src, dst in [(3, 6), (5, 0)]:
                assert torch.equal(segment.cache[dst], full[src, layer:layer + 1])
            assert not segment.cache[[1, 2, 3, 4, 5, 7]].any()
    finally:
        if puller is not None:
            puller.close()
        if decode is not None:
            decode.close()
        done.set()
        child.join(60)


def test_shm_cannot_carry_a_gpu_cache():
    from distserve.transfer.base import check_backend_device
    with pytest.raises(ValueError, match="use --transfer tcp"):
        check_backend_device(KVLink("shm", SECRET).backend, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="use --transfer tcp"):
        make_source("shm", KVCacheShape(1, 1, 8, 4), 2, torch.float32, "cuda", secret=SECRET)
