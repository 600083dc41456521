"""Packed weights on huge pages: one buffer, 2 MB aligned, in the modules' order, backed by
2 MB pages where the kernel allows it, and the layers' results unchanged."""
import gc
import pathlib

import pytest
import torch
from torch import nn

from distserve.kv.cache import KVCacheShape, allocate_kv_cache
from distserve.models import huge_pages
from distserve.models.packed_linear import PackedLinear, block_kernel, can_pack, pack_linears

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of Linux's transparent huge pages: always, madvise or never."""
    try:
        return THP.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address`."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_zeroed_bytes_is_aligned_writable_and_outlives_its_mapping():
    t = huge_pages.zeroed_bytes(5 << 20)
    assert t.numel() == 5 << 20 and t.dtype == torch.uint8 and t.data_ptr() % huge_pages.HUGE_PAGE == 0
    gc.collect()  # only the tensor holds the mapping now
    t.fill_(7)
    assert int(t[::4096].sum()) == 7 * len(range(0, 5 << 20, 4096))
    assert huge_pages.zeroed_bytes(0).numel() == 0


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="this kernel gives no transparent huge pages")
def test_zeroed_bytes_is_backed_by_huge_pages():
    t = huge_pages.zeroed_bytes(16 << 20)
    t.fill_(1)  # the first touch faults the pages in
    assert huge_kb_at(t.data_ptr()) >= 2048


def test_one_arena_lays_tensors_out_in_order_and_aligned():
    shapes = [(3, 5), (7,), (2, 2, 2), (1000, 3)]
    views = huge_pages.one_arena(shapes, torch.bfloat16)
    assert [tuple(v.shape) for v in views] == shapes and all(v.dtype == torch.bfloat16 for v in views)
    assert all(v.is_contiguous() and v.data_ptr() % 4096 == 0 for v in views)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1   # one buffer
    for a, b in zip(views, views[1:]):   # in order, none overlapping the next
        assert a.data_ptr() + a.numel() * 2 <= b.data_ptr()
    for i, v in enumerate(views):
        v.fill_(i)
    assert [float(v.float().mean()) for v in views] == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")) or not block_kernel(32),
                    reason="this CPU runs none of our block kernels")
def test_pack_linears_puts_our_kernels_weights_in_one_arena_with_the_same_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40, bias=False),
                          nn.Linear(40, 8)).to(torch.bfloat16)   # 40 inputs: not our kernels'
    alone = [PackedLinear(m) for m in model if isinstance(m, nn.Linear)]
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    pack_linears(model)
    ours = [m.packed_weight for m in model if isinstance(m, PackedLinear) and m.kernel in ("amx", "dpbf16", "avx2")]
    assert len(ours) == 2 and ours[0].untyped_storage().data_ptr() == ours[1].untyped_storage().data_ptr()
    assert ours[0].data_ptr() < ours[1].data_ptr()
    h = torch.relu(alone[0](x))
    torch.testing.assert_close(model(x), alone[2](alone[1](h)), rtol=0, atol=0)


def test_the_cpu_kv_cache_is_zeros_on_huge_page_memory():
    shape = KVCacheShape(num_layers=2, num_kv_heads=3, head_dim=64, block_size=16)
    cache = allocate_kv_cache(shape, 700, torch.bfloat16)   # 700 x 12 KB: 8.2 MB
    assert cache.shape == shape.tensor_shape(700) and cache.is_contiguous() and not cache.any()
    assert cache.data_ptr() % huge_pages.HUGE_PAGE == 0
