"""Copies checkpoint tensors into a model whose projections are fused (q/k/v, gate/up).

Shared by every architecture: each gives a name normaliser and its fused pieces; this
checks shapes, refuses unknown names and reports missing weights by name.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

# part name in the checkpoint -> (fused parameter's part name, row offset, rows)
FusedPieces = dict[str, tuple[str, int, int]]


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 normalise: Callable[[str], str | None], fused: FusedPieces) -> None:
    """`normalise` maps a checkpoint name to the model's name, or None to skip it."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for raw_name, tensor in weights:
        name = normalise(raw_name)
        if name is None:
            continue
        target, offset, size = name, 0, None
        for part, (fused_name, off, rows) in fused.items():
            if f".{part}." in name:
                target, offset, size = name.replace(f".{part}.", f".{fused_name}."), off, rows
                break
        if target not in params:
            raise ValueError(f"unexpected weight {raw_name!r} in the checkpoint")
        dest = params[target].data
        if size is not None:
            dest = dest.narrow(0, offset, size)
        if dest.shape != tensor.shape:
            raise ValueError(f"weight {raw_name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(dest.shape)}")
        dest.copy_(tensor)
        loaded.add(f"{target}@{offset}")
    missing = _expected(params, fused) - loaded
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weight(s), e.g. "
                         f"{sorted(missing)[:3]}")


def _expected(params: dict[str, nn.Parameter], fused: FusedPieces) -> set[str]:
    by_fused: dict[str, list[int]] = {}
    for _, (fused_name, off, _) in fused.items():
        by_fused.setdefault(fused_name, []).append(off)
    pieces = set()
    for name in params:
        offsets = by_fused.get(name.split(".")[-2], [0])
        pieces.update(f"{name}@{off}" for off in offsets)
    return pieces
