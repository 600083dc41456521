"""What one worker of a tensor- and pipeline-parallel instance holds, and its weights.

Workers are numbered stage-major: rank = stage * tp + tp_rank. A stage owns a contiguous
range of layers; inside a stage, each worker owns a contiguous range of KV heads with the
query heads that attend to them (so grouped-query attention needs no communication), a range
of FFN columns and a range of the vocabulary for the LM head. The two row-parallel matmuls
of a layer (attention output, FFN down) are summed across the stage's workers; every other
weight is replicated. Ranges need not be equal: SmolLM2's 3 KV heads split 2 + 1 over TP 2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

Range = tuple[int, int]


def split_ranges(n: int, parts: int) -> list[Range]:
    """`n` items as `parts` contiguous ranges whose sizes differ by at most one."""
    if parts < 1 or parts > n:
        raise ValueError(f"cannot split {n} into {parts} non-empty parts")
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (i < r)
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class ModelDims:
    """The sizes sharding cuts along, read from a model's config."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class Shard:
    tp: int
    pp: int
    rank: int
    layers: Range
    kv_heads: Range
    heads: Range
    ffn: Range
    vocab: Range

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def is_whole(self) -> bool:
        return self.tp == 1 and self.pp == 1


def check_parallelism(dims: ModelDims, tp: int, pp: int) -> None:
    """Refuse, by name, a TP or PP this model cannot be split into."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be >= 1, got TP {tp}, PP {pp}")
    if tp > dims.num_kv_heads:
        raise ValueError(f"TP {tp} exceeds the model's {dims.num_kv_heads} KV heads (each "
                         "worker holds whole KV heads)")
    if pp > dims.num_layers:
        raise ValueError(f"PP {pp} exceeds the model's {dims.num_layers} layers")


def make_shard(dims: ModelDims, tp: int, pp: int, rank: int) -> Shard:
    check_parallelism(dims, tp, pp)
    if not 0 <= rank < tp * pp:
        raise ValueError(f"rank {rank} is outside TP {tp} x PP {pp}")
    t, stage = rank % tp, rank // tp
    group = dims.num_heads // dims.num_kv_heads  # query heads per KV head
    kv = split_ranges(dims.num_kv_heads, tp)[t]
    return Shard(tp, pp, rank, split_ranges(dims.num_layers, pp)[stage], kv,
                 (kv[0] * group, kv[1] * group), split_ranges(dims.ffn, tp)[t],
                 split_ranges(dims.vocab, tp)[t])


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    """A row-parallel matmul's sum over workers when there is one worker."""
    return x

# how a checkpoint weight is cut: by its name's part -> (dim, what the rows or columns are)
Cuts = dict[str, tuple[int, str]]


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], shard: Shard, cuts: Cuts,
                  head_dim: int, stage_only: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """This worker's slices of full checkpoint tensors, with layer numbers made stage-local.

    cuts: e.g. {"q_proj": (0, "heads"), "o_proj": (1, "heads"), "down_proj": (1, "ffn")}. A
    weight cut along dim 1 is summed over the workers, so its bias is kept by TP rank 0 only
    (the others' is zero). Weights named in `stage_only` (the LM head) live on the last stage.
    """
    first, last = shard.layers
    for name, tensor in weights:
        match = re.search(r"layers\.(\d+)\.", name)
        if match:
            i = int(match.group(1))
            if not first <= i < last:
                continue
            name = name.replace(f"layers.{i}.", f"layers.{i - first}.", 1)
        elif any(part in name for part in stage_only) and not shard.is_last_stage:
            continue
        part = next((p for p in cuts if f".{p}." in name or name.startswith(f"{p}.")), None)
        if part is None or shard.tp == 1:
            yield name, tensor
            continue
        dim, kind = cuts[part]
        lo, hi = getattr(shard, kind)
        if kind in ("heads", "kv_heads"):
            lo, hi = lo * head_dim, hi * head_dim
        if name.endswith(".bias") and dim == 1:
            yield name, tensor if shard.tp_rank == 0 else torch.zeros_like(tensor)
        elif name.endswith(".bias") or dim == 0:
            yield name, tensor.narrow(0, lo, hi - lo)
        else:
            yield name, tensor.narrow(1, lo, hi - lo)
