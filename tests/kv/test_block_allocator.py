import pytest

from distserve.kv.block_allocator import BlockAllocator, NoFreeBlocksError
from distserve.kv.cache_manager import KVCacheManager, blocks_for
from distserve.request import Request, SamplingParams


def test_allocate_free_and_refcounts():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert len(set(x)) == 3 and a.num_free == 1
    with pytest.raises(NoFreeBlocksError):
        a.allocate(2)
    a.incref(x[:1])
    a.free(x)
    assert a.num_free == 3  # the shared block is still held once
    a.free(x[:1])
    assert a.num_free == 4
    a.check()
    with pytest.raises(ValueError, match="freed twice"):
        a.free(x[:1])


def test_cache_manager_grows_block_tables():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    r = Request("r", [1, 2, 3], SamplingParams())
    kv.allocate(r, 4)
    assert len(r.block_table) == 1
    kv.allocate(r, 5)
    assert len(r.block_table) == 2
    assert kv.can_allocate(r, 20) and not kv.can_allocate(r, 21)
    kv.free(r)
    assert r.block_table == [] and kv.num_free_blocks == 5
    assert blocks_for(0, 4) == 0 and blocks_for(9, 4) == 3


def test_zero_blocks_is_an_error():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockAllocator(0)
