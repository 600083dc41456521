"""KV cache capacity of an instance, and whether a (TP, PP) fits at all.

The artifact's max_num_tokens.csv (A100-80GB, 95% memory use) is used as is where it has the
(model, TP, PP); elsewhere the same arithmetic: the GPUs' usable memory, less the weights and
an activation reserve per GPU, divided by the KV bytes of a token. Never imports torch.
"""
from __future__ import annotations

import csv
import functools
import os

from distserve.planner.profiles import DATA

MEMORY_UTILIZATION = 0.95
ACTIVATION_RESERVE = 2.5e9   # bytes per GPU kept for activations and the runtime


@functools.lru_cache(maxsize=1)
def _artifact_table() -> dict:
    with open(os.path.join(DATA, "max_num_tokens.csv"), newline="", encoding="utf-8") as f:
        return {(r["model"].lower(), int(r["tp"]), int(r["pp"])): int(r["max_num_tokens"])
                for r in csv.DictReader(f)}


def kv_capacity_tokens(model, hw, tp: int, pp: int) -> int:
    """Tokens of KV cache the instance holds (0 when the weights alone do not fit)."""
    if hw.name == "a100-80g":
        known = _artifact_table().get((model.name.lower(), tp, pp))
        if known is not None:
            return known
    gpus = tp * pp
    free = gpus * (hw.memory * MEMORY_UTILIZATION - ACTIVATION_RESERVE) - model.weight_bytes
    return max(0, int(free // model.kv_bytes_per_token))


def check_parallelism(model, hw, tp: int, pp: int, min_kv_tokens: int) -> str | None:
    """None when (TP, PP) is allowed, else why not: TP divides the heads, PP the layers, and
    the memory holds the weights plus a KV pool of `min_kv_tokens`."""
    if not model.valid_tp(tp):
        return f"TP {tp} does not divide the {model.heads} heads (KV heads {model.kv_heads})"
    if not model.valid_pp(pp):
        return f"PP {pp} does not divide the {model.layers} layers"
    cap = kv_capacity_tokens(model, hw, tp, pp)
    if cap < min_kv_tokens:
        return (f"TP {tp} x PP {pp} on {hw.name}: room for {cap} KV tokens after the weights, "
                f"need at least {min_kv_tokens}")
    return None
