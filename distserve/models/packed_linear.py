"""bf16 linear layers on CPU with their weights re-laid out once for oneDNN.

Why: a decode step is a chain of small-M GEMMs that must stream every weight. Over the
1.1 GB benchmark model's matrices, one pass at M = 1 took 63 ms with `F.linear` on the
plain row-major weights and 43 ms on weights oneDNN has blocked for itself (25 GB/s, this
machine's read bandwidth); at M = 32, 70 vs 53 ms; prefill is no slower. Results agree with
`F.linear` to bf16 rounding (bit for bit at M = 1 in our checks).
Only bf16 on CPUs with native bf16 is packed: float32 stays on `F.linear`, so float32 runs
match transformers exactly.
"""
from __future__ import annotations

import torch
from torch import nn

# oneDNN picks its weight layout for an expected number of rows; 32 measured best or
# within noise of the best from M = 1 (decoding one request) to M = 2048 (prefill)
_ROWS_HINT = 32


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: nn.Module) -> None:
    """Swap every nn.Linear for a PackedLinear, after the weights are loaded.

    A weight shared with another module (a tied embedding) stays there: the packed copy is
    the only extra memory. Any other plain weight is freed with its nn.Linear.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
