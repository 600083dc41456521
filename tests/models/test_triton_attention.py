"""The Triton paged decode attention (models/triton_attention.py) against SDPA over the
gathered blocks: on a GPU where there is one, else on CPU tensors in Triton's interpreter (a
subprocess with TRITON_INTERPRET=1, which Triton reads when the kernel is defined)."""
import os
import subprocess
import sys

import pytest
import torch

from distserve.models import triton_attention
from distserve.models.attention import build_decode_mask, gathered_decode_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not triton_attention.installed(), reason="Triton is not installed")
kernel_case = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                 reason="on CPU, run in Triton's interpreter by the test below")


def reference(q, cache, tables, lens, scale):
    """The torch path, in float32."""
    mask = build_decode_mask(lens, tables.shape[1] * cache.shape[2], torch.float32)
    return gathered_decode_attention(q.float(), cache.float(), tables, mask, scale)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 32), (4, 2, 64), (6, 2, 80), (9, 3, 128)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_it_matches_attention_over_the_gathered_blocks(dtype, heads, kv_heads, dim, block_size):
    torch.manual_seed(heads * dim + block_size)
    lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 2], device=DEVICE)
    num_blocks = 16
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, dim, dtype=dtype, device=DEVICE)
    tables = torch.stack([torch.randperm(num_blocks)[:4] for _ in lens]).to(DEVICE)
    # q as the fused q/k/v projection leaves it: the first heads of wider rows
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, dim, dtype=dtype, device=DEVICE)
    q = qkv[:, :heads]
    out = triton_attention.paged_decode_attention(q, cache, tables, lens, dim ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2   # bf16: the output's own rounding
    torch.testing.assert_close(out.float(), reference(q, cache, tables, lens, dim ** -0.5),
                               rtol=tol, atol=tol)


@kernel_case
def test_a_block_size_that_is_no_power_of_two_is_refused():
    cache = torch.zeros(4, 2, 12, 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="block size 12"):
        triton_attention.paged_decode_attention(torch.zeros(1, 1, 32, device=DEVICE), cache,
                                                torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
                                                torch.ones(1, dtype=torch.long, device=DEVICE), 1.0)


def test_it_serves_only_what_it_can():
    assert not triton_attention.available(torch.device("cpu"), 16, torch.bfloat16)
    assert not triton_attention.available(torch.device("cuda"), 12, torch.bfloat16)  # no power of 2


@pytest.mark.skipif(INTERPRETED or DEVICE == "cuda", reason="the cases above run here directly")
def test_the_kernel_cases_pass_in_tritons_interpreter():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "18 passed" in summary and "failed" not in summary, summary
