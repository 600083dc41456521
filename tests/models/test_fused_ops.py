"""The fused elementwise kernels of the Llama layer (csrc/fused_ops.cpp) against the torch
ops they replace, and a bf16 model run with and without them."""
import shutil
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from distserve.models import fused, paged_kernel
from distserve.models.layers import apply_rotary

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on this machine: the torch ops are used")
ops = torch.ops.distserve_cpu
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@contextmanager
def torch_ops_only():
    available = paged_kernel._state.get("ok")
    paged_kernel._state["ok"] = False
    try:
        yield
    finally:
        paged_kernel._state["ok"] = available


@pytest.fixture(autouse=True)
def built():
    assert paged_kernel.kernel_available()


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 576), (33, 960)])
def test_add_rms_norm_matches_add_then_norm(dtype, rows, dim):
    g = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, dim, generator=g).to(dtype) for _ in range(2))
    weight = (torch.rand(dim, generator=g) + 0.5).to(dtype)
    want_res = x + residual                       # rounded to dtype, as the unfused layer keeps it
    want = F.rms_norm(want_res.float(), (dim,), weight.float(), 1e-5)
    x2, r2 = x.clone(), residual.clone()
    ops.add_rms_norm_(x2, r2, weight, 1e-5)
    assert torch.equal(r2, want_res)
    torch.testing.assert_close(x2.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_is_the_fused_norm_with_nothing_to_add_and_leaves_x_alone(dtype):
    """The first layer's norm: the fused decode stack computes it as add_rms_norm_ over a zero
    residual, and the Python layers the same way, so both give the same bits."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 576, generator=g).to(dtype)
    weight = (torch.rand(576, generator=g) + 0.5).to(dtype)
    kept = x.clone()
    got = fused.rms_norm(x, weight, 1e-5)
    assert torch.equal(x, kept)
    want, residual = x.clone(), torch.zeros_like(x)
    ops.add_rms_norm_(want, residual, weight, 1e-5)
    assert torch.equal(got, want) and torch.equal(residual, x)
    torch.testing.assert_close(got.float(), F.rms_norm(x.float(), (576,), weight.float(), 1e-5),
                               atol=TOL[dtype], rtol=TOL[dtype])
    with torch_ops_only():
        assert torch.equal(fused.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5))


@pytest.mark.parametrize("dtype", list(TOL))
def test_silu_mul_matches_silu_times_up(dtype):
    g = torch.Generator().manual_seed(1)
    gate_up = (3 * torch.randn(9, 2 * 1536, generator=g)).to(dtype)
    got = torch.empty(9, 1536, dtype=dtype)
    ops.silu_mul(got, gate_up)
    if dtype != torch.float32:   # the model's wrapper takes the kernel for bf16/fp16
        assert torch.equal(fused.silu_mul(gate_up), got)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert got.dtype == dtype and got.shape == (9, 1536)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hq,hkv,dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_rotary_cache_write_rotates_q_and_k_and_fills_only_their_slots(dtype, hq, hkv, dim):
    g = torch.Generator().manual_seed(hq)
    tokens, bs = 11, 4
    heads = torch.randn(tokens, hq + 2 * hkv, dim, generator=g).to(dtype)
    angles = torch.rand(tokens, dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    signed_sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)
    cache = torch.full((8, 3, 2, bs, hkv, dim), 7.0).to(dtype)[:, 1]   # one layer's view
    slots = torch.randperm(8 * bs, generator=g)[:tokens]
    blocks, offsets = slots // bs, slots % bs
    want = heads.float().clone()
    want[:, :hq + hkv] = apply_rotary(want[:, :hq + hkv], cos.float()[:, None], signed_sin.float()[:, None])
    ops.rotary_cache_write(heads, cos, signed_sin, cache, blocks, offsets, hq)
    torch.testing.assert_close(heads.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    assert torch.equal(cache[blocks, 0, offsets], heads[:, hq:hq + hkv])
    assert torch.equal(cache[blocks, 1, offsets], heads[:, hq + hkv:])
    untouched = torch.ones(8, bs, dtype=torch.bool)
    untouched[blocks, offsets] = False
    assert (cache.permute(0, 2, 1, 3, 4)[untouched] == 7.0).all()


def test_the_model_wrapper_takes_the_kernel_in_bf16():
    heads = torch.randn(2, 3, 8).to(torch.bfloat16)
    cache = torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16)
    cos, sin = torch.ones(2, 1, 8, dtype=torch.bfloat16), torch.zeros(2, 1, 8, dtype=torch.bfloat16)
    slots = torch.tensor([0, 5])
    assert fused.rotary_cache_write(heads, cos, sin, cache, slots // 4, slots % 4, 1)
    assert torch.equal(cache[1, 1, 1, 0], heads[1, 2])   # token 1's v in block 1, slot 1


def test_bad_inputs_name_the_problem():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.add_rms_norm_(x, x.clone(), torch.ones(4, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.add_rms_norm_(x, x.float(), torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="gate_up"):
        ops.silu_mul(x, torch.zeros(2, 8, dtype=torch.bfloat16))
    heads = torch.zeros(3, 5, 8, dtype=torch.bfloat16)   # 3 q + 1 k + 1 v
    cache = torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16)
    slots = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="one per token"):
        ops.rotary_cache_write(heads, x[:1].repeat(3, 1), x[:1].repeat(3, 1), cache, slots[:2], slots, 3)
    with pytest.raises(RuntimeError, match="q, k and v"):
        ops.rotary_cache_write(heads, x[:1].repeat(3, 1), x[:1].repeat(3, 1), cache, slots, slots, 2)


def test_float32_keeps_the_torch_ops():
    """Float32 must stay bit for bit with transformers: the fused path is bf16/fp16 only."""
    x, residual, w = torch.randn(3, 16), torch.randn(3, 16), torch.rand(16)
    got, res = fused.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    assert torch.equal(res, x + residual)
    assert torch.equal(got, F.rms_norm(x + residual, (16,), w, 1e-6))
    assert torch.equal(fused.rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))
    heads = torch.randn(2, 3, 8)
    assert not fused.rotary_cache_write(heads, torch.ones(2, 1, 8), torch.zeros(2, 1, 8),
                                        torch.zeros(2, 2, 4, 1, 8), torch.zeros(2, dtype=torch.long),
                                        torch.zeros(2, dtype=torch.long), 1)


def test_a_bf16_model_gives_the_same_distributions_with_and_without_the_fused_kernels(tiny_llama):
    """Through the prefill and the decode path (test_correctness checks both against
    transformers too)."""
    from distserve import LLM, SamplingParams
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=5)
    llm = LLM(str(tiny_llama), dtype="bfloat16", num_kv_blocks=64, num_threads=1)
    fused_out = llm.generate(prompts, params)
    with torch_ops_only():
        plain_out = llm.generate(prompts, params)
    for a, b in zip(fused_out, plain_out):
        steps = 2 if a.token_ids[0] == b.token_ids[0] else 1   # a bf16 tie may pick another token
        for step in range(steps):
            for token, logprob in b.top_logprobs[step].items():
                if token in a.top_logprobs[step]:
                    assert a.top_logprobs[step][token] == pytest.approx(logprob, abs=0.05)
            assert abs(a.logprobs[step] - b.logprobs[step]) < 0.05


def test_a_norm_weight_of_another_dtype_takes_the_torch_ops():
    x, residual = torch.randn(3, 16).to(torch.bfloat16), torch.randn(3, 16).to(torch.bfloat16)
    w = torch.rand(16)   # float32
    got, res = fused.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    assert torch.equal(res, x + residual)
    assert torch.equal(got, F.rms_norm(x + residual, (16,), w, 1e-6))
