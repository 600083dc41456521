"""The Triton kernels (imported only on first use: importing Triton takes ~0.2 s, and CPU-only
processes never need it). See triton_attention.py for what they do and why."""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_tb"])  # the eager table width varies by step
def paged_decode_kernel(out_ptr, q_ptr, cache_ptr, tables_ptr, lens_ptr, scale,
                        stride_qb, stride_qh, stride_cb, stride_ckv, stride_cs, stride_ch,
                        stride_tb, stride_ob, stride_oh,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr,
                        DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    s = tl.arange(0, BLOCK)
    g_ok, d_ok = g < GROUP, d < DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    top = tl.full([GROUP_PAD], float("-inf"), tl.float32)   # running max of the scores
    total = tl.zeros([GROUP_PAD], tl.float32)                # running sum of exp(score - top)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for i in range(0, tl.cdiv(context, BLOCK)):
        block = tl.load(tables_ptr + b * stride_tb + i).to(tl.int64)
        s_ok = i * BLOCK + s < context
        rows = cache_ptr + block * stride_cb + s[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        kv_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(rows, mask=kv_ok, other=0.0).to(tl.float32)                # [BLOCK, DIM]
        v = tl.load(rows + stride_ckv, mask=kv_ok, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale        # [GROUP, BLOCK]
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        p = tl.exp(scores - new_top[:, None])
        shrink = tl.exp(top - new_top)
        total = total * shrink + tl.sum(p, axis=1)
        acc = acc * shrink[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        top = new_top
    out = acc / total[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
