"""Paged attention against plain attention over contiguous K/V."""
import torch

from distserve.models.attention import AttentionMetadata, PrefillSegment, paged_attention


def _reference(q, k, v, num_cached, scale):
    # q [n, Hq, D], k/v [S, Hkv, D]: causal, with the first num_cached keys visible to all
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(num_cached, num_cached + q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_chunk_and_decode_read_through_block_tables():
    torch.manual_seed(0)
    bs, hq, hkv, d = 4, 4, 2, 8
    cache = torch.zeros(10, 2, bs, hkv, d)
    # request A: 6 tokens already cached in blocks [7, 2]; now a chunk of 3 more (block 2, 5)
    # request B: 9 tokens cached in blocks [1, 8, 3]; now decodes its 10th token
    ka, va = torch.randn(9, hkv, d), torch.randn(9, hkv, d)
    kb, vb = torch.randn(10, hkv, d), torch.randn(10, hkv, d)
    table_a, table_b = [7, 2, 5], [1, 8, 3]
    for toks, table, k, v in ((6, table_a, ka, va), (9, table_b, kb, vb)):
        for p in range(toks):
            cache[table[p // bs], 0, p % bs] = k[p]
            cache[table[p // bs], 1, p % bs] = v[p]
    qa, qb = torch.randn(3, hq, d), torch.randn(1, hq, d)
    meta = AttentionMetadata(
        slot_blocks=torch.tensor([2, 2, 5, 3]), slot_offsets=torch.tensor([2, 3, 0, 1]),
        prefills=[PrefillSegment(0, 3, 9, torch.tensor(table_a))], num_prefill_tokens=3,
        decode_block_tables=torch.tensor([table_b]), decode_context_lens=torch.tensor([10]))
    out = paged_attention(torch.cat([qa, qb]), torch.cat([ka[6:], kb[9:]]),
                          torch.cat([va[6:], vb[9:]]), cache, meta, 0.3)
    torch.testing.assert_close(out[:3], _reference(qa, ka, va, 6, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:], _reference(qb, kb, vb, 9, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[5, 0, 0], ka[8])
