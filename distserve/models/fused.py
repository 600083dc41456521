"""The Llama layer's elementwise steps, fused into one pass each on CPUs in bf16/fp16
(csrc/fused_ops.cpp, built with the paged attention kernel), with the torch ops they replace
everywhere else. Float32 keeps the torch ops: float32 runs stay bit for bit with transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distserve.models import paged_kernel


def _fused(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)
            and paged_kernel.kernel_available())


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual). Fused, both are written in place:
    `x` and `residual` must be the caller's to overwrite."""
    if (_fused(x) and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous()
            and residual.dtype == weight.dtype == x.dtype):
        torch.ops.distserve_cpu.add_rms_norm_(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return F.rms_norm(residual, weight.shape, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * weight, x left as it is. Fused, as add_rms_norm with a zero residual (x +
    0 is x): the first layer's norm in the fused decode stack (csrc/decode_layers.cpp), so
    both paths give the same bits."""
    if _fused(x) and x.dim() == 2 and x.is_contiguous() and weight.dtype == x.dtype:
        out = x.clone()
        torch.ops.distserve_cpu.add_rms_norm_(out, torch.zeros_like(x), weight, eps)
        return out
    return F.rms_norm(x, weight.shape, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    if _fused(gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous():
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        torch.ops.distserve_cpu.silu_mul(out, gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_cache_write(heads: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                       layer_cache: torch.Tensor, slot_blocks: torch.Tensor,
                       slot_offsets: torch.Tensor, num_q_heads: int) -> bool:
    """Rotate the q and k heads of `heads` [T, Hq + 2 Hkv, D] in place and write k and v into
    their cache slots, where the fused kernel applies; False (nothing done) elsewhere."""
    if not (_fused(heads) and heads.is_contiguous() and layer_cache.dtype == heads.dtype
            and layer_cache.stride(-2) == heads.shape[-1] and layer_cache.stride(-1) == 1):
        return False
    t, d = heads.shape[0], heads.shape[-1]
    torch.ops.distserve_cpu.rotary_cache_write(heads, cos.reshape(t, d), signed_sin.reshape(t, d),
                                               layer_cache, slot_blocks, slot_offsets, num_q_heads)
    return True
