"""Building blocks shared by the architectures: RMSNorm and rotary embeddings."""
from __future__ import annotations

import math

import torch
from torch import nn

from distserve.models import fused


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's Llama does, then cast back.

    F.rms_norm does that arithmetic in fewer kernels than spelling it out: bit-identical in
    float32; in bf16 it applies the weight before rounding, within one bf16 ulp. On CPUs in
    bf16/fp16 the fused kernel (models/fused.py) does the same arithmetic in one pass.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with `residual`: (rms_norm(x + residual), x + residual), fused on CPUs
        in bf16/fp16 (x and residual are then overwritten)."""
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with Llama 3 ("llama3") or linear position scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", None):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotary embeddings (rotate-half convention), computed as Hugging Face's Llama does.

    `cos_sin` looks the positions up once per step for every layer; `apply_rotary` then costs
    four kernels per layer for q and k together.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._tables: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> [2, max_pos, D]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, 1, D] and sin [T, 1, D] with its first half negated, in `dtype`.

        Like Hugging Face, the angles are computed in float32 and cast to the activations'
        dtype; the rotation then runs in that dtype.
        """
        rows = self.table(positions.device, dtype)[:, positions]
        return rows[0].unsqueeze(1), rows[1].unsqueeze(1)

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[2, max_positions, D]: cos, and sin with its first half negated, of every position."""
        key = (device, dtype)
        if key not in self._tables:
            t = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            sin[:, : self.head_dim // 2].neg_()  # exact: only the sign changes
            self._tables[key] = torch.stack([cos, sin]).to(device)
        return self._tables[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> x * cos + rotate_half(x) * sin, bit for bit.

    rotate_half(x) = cat(-x2, x1); swapping the halves and folding the minus sign into sin
    gives the same products exactly (negation is exact) in one copy instead of four.
    """
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin
