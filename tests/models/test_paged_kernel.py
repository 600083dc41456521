"""The compiled paged decode-attention kernel against the torch path (gather + SDPA)."""
import shutil

import pytest
import torch

from distserve.models import attention, paged_kernel
from distserve.models.attention import AttentionMetadata, gather_blocks

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on this machine: the torch path is used")


def torch_path(q, layer_cache, tables, lens, scale):
    meta = AttentionMetadata(slot_blocks=None, slot_offsets=None, prefills=[], num_prefill_tokens=0,
                             decode_block_tables=tables, decode_context_lens=lens)
    available = paged_kernel._state.get("ok")
    paged_kernel._state["ok"] = False
    try:
        return attention._decode_attention(q, layer_cache, meta, scale)
    finally:
        paged_kernel._state["ok"] = available


def random_case(dtype, num_heads, num_kv_heads, head_dim, lens, layers=3, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    bs = 16
    widths = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(widths) + 5
    cache = torch.randn(num_blocks, layers, 2, bs, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)  # blocks scattered through the cache
    tables = torch.zeros(len(lens), max(widths), dtype=torch.long)
    used = 0
    for row, w in enumerate(widths):
        tables[row, :w] = perm[used:used + w]
        used += w
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    return q, cache[:, layer], tables, torch.tensor(lens, dtype=torch.long)


def test_kernel_builds_here():
    assert paged_kernel.kernel_available()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                        (torch.float16, 4e-3)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (4, 2, 24),
                                              (16, 2, 64), (10, 2, 128), (4, 1, 256)])
def test_kernel_matches_torch_path(dtype, atol, heads, kv_heads, dim):
    lens = [1, 15, 16, 17, 100, 333]  # inside one block, on and across block boundaries
    q, cache, tables, ctx = random_case(dtype, heads, kv_heads, dim, lens)
    scale = dim ** -0.5
    got = paged_kernel.paged_decode_attention(q, cache, tables, ctx, scale)
    want = torch_path(q, cache, tables, ctx, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_kernel_reads_only_the_context():
    """Whatever lies past a request's length, in its last block or its padded table, is ignored."""
    q, cache, tables, ctx = random_case(torch.float32, 4, 2, 64, [5, 40])
    before = paged_kernel.paged_decode_attention(q, cache, tables, ctx, 0.125)
    last = tables[0, 0]
    cache[last, :, 5:] = 1e4  # slots after token 5 of request 0's only block
    tables_padded = torch.cat([tables, torch.full((2, 3), 10**6)], dim=1)  # junk past the width
    after = paged_kernel.paged_decode_attention(q, cache, tables_padded, ctx, 0.125)
    torch.testing.assert_close(after, before)
    # and the context it does read matters: change a real token and the output moves
    cache[tables[1, 2], 0, 3] += 1.0
    moved = paged_kernel.paged_decode_attention(q, cache, tables, ctx, 0.125)
    assert not torch.allclose(moved[1], before[1])


def test_kernel_rejects_mismatched_inputs():
    q, cache, tables, ctx = random_case(torch.float32, 4, 2, 64, [5])
    with pytest.raises(RuntimeError, match="share a dtype"):
        paged_kernel.paged_decode_attention(q.to(torch.bfloat16), cache, tables, ctx, 0.125)
    with pytest.raises(RuntimeError, match="multiple of the KV heads"):
        paged_kernel.paged_decode_attention(q[:, :3], cache, tables, ctx, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        paged_kernel.paged_decode_attention(q, cache, tables.int(), ctx, 0.125)


def test_gather_blocks_still_serves_chunked_prefill():
    q, cache, tables, ctx = random_case(torch.float32, 4, 2, 64, [20])
    k = gather_blocks(cache, tables[0], 0)
    assert torch.equal(k[16], cache[tables[0, 1], 0, 0])


def test_kernel_reads_q_heads_straight_from_the_fused_projection():
    """q as the q/k/v projection leaves it (rows Hq + 2 Hkv heads apart) gives what a
    contiguous copy gives, bit for bit."""
    q, cache, tables, ctx = random_case(torch.bfloat16, 9, 3, 64, [5, 40, 17])
    qkv = torch.randn(3, 9 + 6, 64).to(torch.bfloat16)
    qkv[:, :9] = q
    strided = qkv[:, :9]
    assert not strided.is_contiguous()
    got = paged_kernel.paged_decode_attention(strided, cache, tables, ctx, 0.125)
    torch.testing.assert_close(got, paged_kernel.paged_decode_attention(q, cache, tables, ctx, 0.125),
                               rtol=0, atol=0)
