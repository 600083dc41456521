"""bf16 linear layers on CPU with their weights re-laid out once, for our own kernels (AMX
tiles, or AVX512-BF16 dot products on CPUs without AMX) or for oneDNN.

Why: a decode step is a chain of small-M GEMMs that must stream every weight. Over the
1.1 GB benchmark model's matrices, one pass at M = 1 took 63 ms with `F.linear` on the
plain row-major weights and 43 ms on weights oneDNN has blocked for itself; at M = 32, 70
vs 53 ms. On CPUs with AMX our own kernel (csrc/amx_linear.cpp) does better again: ~30 us
less per call, and every thread streams its share of the weight in memory order with
prefetching; measured side by side it took 0.45-0.6x oneDNN's time over SmolLM2's matrices
at M = 1-32, and 0.8-0.9x over the 1.1 GB model's at prefill sizes (M = 512-2048). Results
agree with `F.linear` to bf16 rounding. CPUs with AVX512-BF16 but no AMX (AMD Zen 4) run
the same packed blocks through csrc/dpbf16_linear.cpp.
Only bf16 on CPUs with native bf16 is packed: float32 stays on `F.linear`, so float32 runs
match transformers exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distserve.models import avx2_tuning, huge_pages, paged_kernel

# oneDNN picks its weight layout for an expected number of rows; 32 measured best or
# within noise of the best from M = 1 (decoding one request) to M = 2048 (prefill)
_ROWS_HINT = 32


# AMX works on blocks of 32 inputs x 32 outputs (see csrc/amx_linear.cpp)
_AMX_BLOCK = 32


def amx_pack(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] -> [N/32, K/32, 16, 32, 2]: 32 x 32 blocks, column block after column block, each
    as rows of input pairs (AMX's B tile layout); N is padded with zero rows. Written into
    `out` (contiguous, of amx_packed_shape) where given."""
    n, k = weight.shape
    if k % _AMX_BLOCK:
        raise ValueError(f"amx_pack: {k} inputs is not a multiple of {_AMX_BLOCK}")
    blocks = -(-n // _AMX_BLOCK)
    padded = F.pad(weight, (0, 0, 0, blocks * _AMX_BLOCK - n))
    blocked = padded.view(blocks, _AMX_BLOCK, k // _AMX_BLOCK, 16, 2).permute(0, 2, 3, 1, 4)
    return blocked.contiguous() if out is None else out.copy_(blocked)


def amx_packed_shape(out_features: int, in_features: int) -> tuple[int, ...]:
    return (-(-out_features // _AMX_BLOCK), in_features // _AMX_BLOCK, 16, _AMX_BLOCK, 2)


def amx_usable(in_features: int) -> bool:
    return block_kernel(in_features) == "amx"


def block_kernel(in_features: int) -> str | None:
    """Which of our kernels takes a layer with this many inputs on this CPU: "amx",
    "dpbf16" (AVX512-BF16), "avx2" (float32 FMA over bf16 weights), or None (oneDNN's, or
    F.linear where oneDNN has no bf16)."""
    if not (in_features > 0 and in_features % _AMX_BLOCK == 0 and paged_kernel.kernel_available()):
        return None   # the kernels' block loops read at least one whole block of inputs
    if torch.ops.distserve_cpu.amx_available():
        return "amx"
    if torch.ops.distserve_cpu.dpbf16_available():
        return "dpbf16"
    if torch.ops.distserve_cpu.avx2_available():
        return "avx2"
    return None


def block_linear_op(kernel: str):
    """The op of a kernel block_kernel named: op(out, x, packed, bias) with x [M, K], the weight
    packed by amx_pack, out [M, N] written."""
    return getattr(torch.ops.distserve_cpu, f"{kernel}_linear")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, packed_out: torch.Tensor | None = None) -> None:
        """`packed_out`: where our kernels' packed weight goes (else a tensor of its own)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = block_kernel(self.in_features)
        if not self.kernel and not _onednn_bf16():
            self.kernel = "torch"
        weight = linear.weight.detach()
        self.packed_weight = (weight if self.kernel == "torch" else amx_pack(weight, packed_out) if self.kernel
                              else torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch":
            return F.linear(x, self.packed_weight, self.bias)
        if not self.kernel:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.detach()
        block_linear_op(self.kernel)(out, rows, self.packed_weight, bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel or 'onednn'}")


def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fast_bf16() -> bool:
    """Does this CPU run bf16 linear layers fast: oneDNN's native bf16, or one of our kernels."""
    return _onednn_bf16() or block_kernel(_AMX_BLOCK) is not None


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and fast_bf16()


def pack_linears(model: nn.Module) -> None:
    """Swap every nn.Linear for a PackedLinear, after the weights are loaded.

    A weight shared with another module (a tied embedding) stays there: the packed copy is
    the only extra memory. Any other plain weight is freed with its nn.Linear. The weights
    our kernels take are packed into one buffer on huge pages, in the order of the modules
    (a decode step's order): see huge_pages.
    """
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in parent.named_children() if type(child) is nn.Linear]
    ours = [child for _, _, child in found if block_kernel(child.in_features)]
    slots = dict(zip(map(id, ours), huge_pages.one_arena(
        [amx_packed_shape(c.out_features, c.in_features) for c in ours], torch.bfloat16)))
    packed = [PackedLinear(child, slots.get(id(child))) for _, _, child in found]
    for (parent, name, _), module in zip(found, packed):
        setattr(parent, name, module)
    if any(m.kernel == "avx2" for m in packed):
        avx2_tuning.apply()   # how far ahead it prefetches, chosen for this machine
