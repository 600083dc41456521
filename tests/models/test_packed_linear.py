"""oneDNN-packed bf16 linears: same results as F.linear, and tied weights survive packing."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distserve.models.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU has no native bf16 for oneDNN")


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
