"""Packed bf16 linears (our AMX, AVX512-BF16 or AVX2 kernel, or oneDNN): same results as
F.linear, and tied weights survive packing."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distserve.models import paged_kernel
from distserve.models.packed_linear import (PackedLinear, amx_pack, amx_usable, block_kernel, can_pack,
                                            pack_linears)

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU has no fast bf16 linear (oneDNN's or ours)")


@pytest.mark.parametrize("rows", [0, 1, 7, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(),
                        None if linear.bias is None else linear.bias.float())
    torch.testing.assert_close(PackedLinear(linear)(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_pack_linears_swaps_every_linear_and_keeps_a_tied_embedding():
    model = nn.ModuleDict({"embed": nn.Embedding(50, 16), "mlp": nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
                           "head": nn.Linear(16, 50, bias=False)}).to(torch.bfloat16)
    model["head"].weight = model["embed"].weight
    embedding = model["embed"].weight.detach().clone()
    pack_linears(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model["mlp"][0], PackedLinear) and isinstance(model["head"], PackedLinear)
    torch.testing.assert_close(model["embed"].weight, embedding)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(model["head"](x).float(), (x.float() @ embedding.float().T),
                               rtol=2e-2, atol=2e-2)


amx = pytest.mark.skipif(not amx_usable(32), reason="this CPU or kernel build has no AMX")


def _kernels() -> list:
    """Our block kernels this CPU runs, each called directly (whichever PackedLinear picks)."""
    if not paged_kernel.kernel_available():
        return []
    ops = torch.ops.distserve_cpu
    return [k for k, ok in (("amx_linear", ops.amx_available()), ("dpbf16_linear", ops.dpbf16_available()),
                            ("avx2_linear", ops.avx2_available())) if ok]


KERNELS = _kernels()
each_kernel = pytest.mark.parametrize("kernel", KERNELS or [pytest.param(None, marks=pytest.mark.skip(
    reason="this CPU or kernel build has neither AMX, AVX512-BF16 nor AVX2"))])


def run_kernel(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"), dtype=torch.bfloat16)
    getattr(torch.ops.distserve_cpu, kernel)(out, x, amx_pack(weight), bias)
    return out


@each_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 11, 12, 13, 15, 16, 17, 23, 24, 25, 32, 33, 70])
@pytest.mark.parametrize("outputs", [32, 80, 1000])
@pytest.mark.parametrize("inputs", [32, 96])  # one block of inputs, or several
def test_block_kernels_match_f_linear_at_every_row_and_column_tail(kernel, rows, outputs, inputs):
    torch.manual_seed(rows * 1000 + outputs + inputs)
    linear = nn.Linear(inputs, outputs, bias=True, dtype=torch.bfloat16)
    x = torch.randn(rows, inputs, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    # float32 sums of the same bf16 products, rounded once to bf16
    got = run_kernel(kernel, x, linear.weight.detach(), linear.bias.detach())
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=2e-2)


def test_packed_linear_uses_the_best_kernel_this_cpu_has():
    linear = nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)
    expected = {"amx_linear": "amx", "dpbf16_linear": "dpbf16", "avx2_linear": "avx2"}[KERNELS[0]] if KERNELS else None
    assert block_kernel(64) == expected and PackedLinear(linear).kernel == expected
    assert block_kernel(40) is None   # not whole blocks of 32 inputs: oneDNN's kernel


@each_kernel
def test_block_kernels_take_strided_rows(kernel):
    torch.manual_seed(1)
    weight = torch.randn(48, 64, dtype=torch.bfloat16)
    wide = torch.randn(20, 128, dtype=torch.bfloat16)
    x = wide[:, 32:96]  # rows 128 apart, each row contiguous
    torch.testing.assert_close(run_kernel(kernel, x, weight), run_kernel(kernel, x.contiguous(), weight),
                               rtol=0, atol=0)


@each_kernel
@pytest.mark.parametrize("rows", [2, 12, 33])
@pytest.mark.parametrize("inputs", [512, 2048])  # rows of x 1 and 4 KB apart: copied apart first
def test_block_kernels_at_row_strides_of_whole_kilobytes(kernel, rows, inputs):
    torch.manual_seed(rows + inputs)
    weight = torch.randn(80, inputs, dtype=torch.bfloat16) * 0.05
    x = torch.randn(rows, inputs, dtype=torch.bfloat16)
    got = run_kernel(kernel, x, weight)
    torch.testing.assert_close(got.float(), x.float() @ weight.float().T, rtol=1e-2, atol=2e-2)
    apart = torch.zeros(rows, inputs + 32, dtype=torch.bfloat16)[:, :inputs]  # a stride left as it is
    apart.copy_(x)
    torch.testing.assert_close(run_kernel(kernel, apart, weight), got, rtol=0, atol=0)


@each_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_block_kernels_compute_every_column_block_once_whichever_thread_takes_it(kernel, threads):
    """Threads take blocks from the back of each other's shares (more threads than cores here:
    one is often behind); every output column must still be written, with the right sums."""
    torch.manual_seed(threads)
    weight = torch.randn(32 * 61, 64, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 5, 30):
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            for _ in range(5):
                got = run_kernel(kernel, x, weight)   # out starts as NaN
                torch.testing.assert_close(got.float(), x.float() @ weight.float().T, rtol=1e-2, atol=2e-2)
    finally:
        torch.set_num_threads(previous)


@amx
def test_amx_linear_takes_strided_rows_and_leading_dims_and_survives_onednn_between_calls():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    wide = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    x = wide[..., 32:96]  # rows 128 apart, each row contiguous
    first = packed(x)
    assert first.shape == (2, 5, 48)
    # oneDNN's own AMX kernels run in between: each side must configure its tiles itself
    big = torch.randn(64, 256, dtype=torch.bfloat16)
    onednn = torch.ops.mkldnn._linear_pointwise(big, torch.ops.mkldnn._reorder_linear_weight(
        torch.randn(128, 256, dtype=torch.bfloat16), 32), None, "none", [], "")
    assert torch.isfinite(onednn).all()
    torch.testing.assert_close(packed(x.contiguous()), first, rtol=0, atol=0)
    torch.testing.assert_close(first.float(), x.float() @ linear.weight.float().T, rtol=1e-2, atol=2e-2)


def test_amx_pack_lays_blocks_out_as_the_kernel_reads_them():
    weight = torch.arange(40 * 64, dtype=torch.float32).view(40, 64).to(torch.bfloat16)
    packed = amx_pack(weight)
    assert packed.shape == (2, 2, 16, 32, 2)
    # block (column block 1, input block 1), input pair 3, column 5, second of the pair:
    # weight row 32 + 5 = 37, input 32 + 2 * 3 + 1 = 39
    assert packed[1, 1, 3, 5, 1] == weight[37, 39]
    assert (packed[1, :, :, 8:] == 0).all()  # rows 40-63 are padding
    with pytest.raises(ValueError, match="multiple of 32"):
        amx_pack(torch.zeros(8, 40, dtype=torch.bfloat16))


@each_kernel
def test_block_kernels_reject_mismatched_shapes_by_name(kernel):
    packed = amx_pack(torch.zeros(64, 64, dtype=torch.bfloat16))
    op = getattr(torch.ops.distserve_cpu, kernel)
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        op(torch.empty(2, 64, dtype=torch.bfloat16), torch.zeros(2, 32, dtype=torch.bfloat16), packed, None)
    with pytest.raises(RuntimeError, match="bf16 tensors only"):
        op(torch.empty(2, 64), torch.zeros(2, 64), packed, None)
    with pytest.raises(RuntimeError, match="out has the wrong shape"):
        op(torch.empty(2, 100, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16), packed, None)


def test_a_layer_without_inputs_is_not_given_to_our_kernels():
    assert block_kernel(0) is None   # its block loop reads at least one block of weights
