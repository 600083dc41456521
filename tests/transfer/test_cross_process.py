"""Prefill and decode sides in different OS processes, as in a real deployment."""
from __future__ import annotations

import pathlib
import select
import subprocess
import sys
import time

import msgspec
import pytest
import torch

from distserve.kv.cache import allocate_kv_cache
from distserve.transfer import KVEndpoint, TransferError, allocate_shm_cache, make_puller
from distserve.transfer.shm import _segment_exists

from .source_child import NUM_BLOCKS, SECRET, SHAPE, seeded_cache

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]   # a torch child started and killed on a loaded machine

CHILD = pathlib.Path(__file__).with_name("source_child.py")


class _Child:
    """The source child process: its endpoints, and a way to stop it or kill it."""

    def __init__(self, dtype: str, seed: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CHILD), dtype, str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        if not ready:
            self.proc.kill()
            raise RuntimeError("the source child printed no endpoint within 30 s")
        line = self.proc.stdout.readline()
        self.endpoints = msgspec.json.decode(line, type=dict[str, KVEndpoint])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()  # never read to EOF: the child's resource tracker shares it


@pytest.fixture(scope="module")
def child():
    c = _Child("bfloat16", seed=11)
    yield c
    c.stop()
    assert c.proc.returncode == 0
    assert not _segment_exists(c.endpoints["shm"].shm_name)  # the owner unlinked on close


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_pull_from_another_process(child, backend):
    expected = seeded_cache(torch.bfloat16, seed=11)
    puller = make_puller(backend, timeout=10, secret=SECRET)
    try:
        dst_cache = allocate_kv_cache(SHAPE, 16, torch.bfloat16)
        src, dst = [17, 2, 9, 23, 0], [4, 15, 0, 8, 11]
        stats = puller.pull(child.endpoints[backend], src, dst_cache, dst)
        assert torch.equal(dst_cache[dst], expected[src])
        others = [b for b in range(16) if b not in dst]
        assert not dst_cache[others].any()
        assert stats.nbytes == 5 * SHAPE.bytes_per_block(torch.bfloat16) and stats.seconds > 0
    finally:
        puller.close()
    assert _segment_exists(child.endpoints["shm"].shm_name)  # the attacher never unlinks


def test_dead_source_is_an_error_not_a_hang():
    c = _Child("float32", seed=3)
    pullers = {b: make_puller(b, timeout=5, secret=SECRET) for b in ("shm", "tcp")}
    dst_cache = allocate_kv_cache(SHAPE, 4, torch.float32)
    try:
        for b, puller in pullers.items():  # connected and mapped while the source lives
            puller.pull(c.endpoints[b], [1], dst_cache, [0])
        c.proc.kill()
        c.proc.wait(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=str(c.endpoints["tcp"].port)):
            pullers["tcp"].pull(c.endpoints["tcp"], [1], dst_cache, [0])
        assert time.monotonic() - t0 < 5
        # The child's resource tracker unlinks the segment once it sees the child die.
        deadline = time.monotonic() + 10
        while _segment_exists(c.endpoints["shm"].shm_name) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(TransferError, match="is gone"):
            pullers["shm"].pull(c.endpoints["shm"], [1], dst_cache, [0])
    finally:
        for puller in pullers.values():
            puller.close()
        c.stop()


ATTACH_AND_EXIT = """
import sys, msgspec, torch
from distserve.kv.cache import allocate_kv_cache
from distserve.transfer import KVEndpoint, make_puller
ep = msgspec.json.decode(sys.argv[1], type=KVEndpoint)
dst = torch.zeros(2, *ep.block_shape, dtype=ep.torch_dtype)
make_puller("shm", secret=b"shm needs none of it").pull(ep, [3], dst, [1])
print(float(dst[1].sum()))
"""


def test_a_process_that_only_attaches_never_unlinks():
    cache, source = allocate_shm_cache(SHAPE, NUM_BLOCKS, torch.float32)
    try:
        cache.copy_(seeded_cache(torch.float32, seed=5))
        # capture_output waits for the child's resource tracker too (it holds the child's
        # stderr), so an attach it tracked would be unlinked by the time run() returns.
        out = subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT,
                              msgspec.json.encode(source.endpoint).decode()],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout) == pytest.approx(float(cache[3].sum()), rel=1e-5)
        assert "leaked" not in out.stderr
        assert _segment_exists(source.endpoint.shm_name)
    finally:
        source.close()
    assert not _segment_exists(source.endpoint.shm_name)
