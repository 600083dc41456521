"""serve's KV budget per instance where none is given (no --kv-cache-memory, --num-kv-blocks).

DEFAULT_KV_GIB, less where all the instances' KV would take over half the memory available
(default_kv_budget_gib), and for an instance that decodes (colocated or decode) no more than it
can ever hold in use: --max-num-seqs requests of --max-model-len tokens (kv_in_use_gib). A
prefill instance keeps its share: its KV is also the queue of requests that wait for a decode
instance (DESIGN.md). The KV bytes per token come from the model's shape as the planner knows
it (its table, or the folder's config.json), so the server's process never loads the model nor
imports torch.
"""
from __future__ import annotations

import dataclasses
import os

from distserve.cluster.deployment import (available_memory_bytes, default_kv_budget_gib,
                                          instance_device, kv_in_use_gib)

# one K or V element's bytes per --dtype; `auto` is bfloat16 on CUDA and, on a CPU, at most
# float32 (bfloat16 where the CPU runs it fast: reckoned as float32 here, the safe side)
KV_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def served_model_spec(served: str | None):
    """(the planner's ModelSpec of the served model or None where its shape cannot be read
    without loading it, its name): the built-in SmolLM2 from the table, a folder from its
    config.json; a .gguf file other than the built-in one is None."""
    from distserve.planner.models import built_in_spec, from_config_json
    if served is None or served == "default":
        return built_in_spec(), "the built-in SmolLM2-135M"
    if os.path.isfile(os.path.join(served, "config.json")):
        try:
            return from_config_json(served), served
        except (ValueError, OSError, KeyError):
            pass
    return None, served


def kv_dtype(config) -> str | None:
    """The dtype the KV is reckoned in (None for one serve does not know: the engine names it)."""
    if config.dtype == "auto":
        return "bfloat16" if instance_device(config).startswith("cuda") else "float32"
    return config.dtype if config.dtype in KV_DTYPE_BYTES else None


def fit_default_kv(args, config, deployment, rebuild):
    """(config, deployment) with the default budget: the memory share for all, then each
    instance that decodes capped at what it can hold in use; one note per budget cut.
    rebuild(config) makes the deployment again from a new base config."""
    n = deployment.num_instances if deployment is not None else 1
    budget = default_kv_budget_gib(n, available_memory_bytes())
    if budget < config.kv_cache_memory_gib:
        print(f"note: KV cache {budget:g} GiB per instance ({n} instance(s)), so that together "
              "they take at most half the memory available; --kv-cache-memory sets it",
              flush=True)
        config = dataclasses.replace(config, kv_cache_memory_gib=budget)
        deployment = rebuild(config)
    model, name = served_model_spec(args.model)
    if model is None:
        return config, deployment
    notes = {}

    def capped(role, c):
        dtype = kv_dtype(c)
        if dtype is None:
            return c
        per_token = dataclasses.replace(model, dtype_bytes=KV_DTYPE_BYTES[dtype]).kv_bytes_per_token
        max_len = c.max_model_len or model.max_positions
        gib = kv_in_use_gib(c.max_num_seqs, max_len, c.block_size, per_token)
        if gib >= c.kv_cache_memory_gib:
            return c
        notes[role, gib] = (f"note: KV cache {gib:g} GiB per {role} instance, not "
                            f"{c.kv_cache_memory_gib:g}: all that {c.max_num_seqs} requests "
                            f"(--max-num-seqs) of {max_len} tokens (--max-model-len) of {name} "
                            f"can hold in {dtype}; --kv-cache-memory sets it")
        return dataclasses.replace(c, kv_cache_memory_gib=gib)

    if deployment is None:   # one colocated engine in the server's process
        config = capped("colocated", config)
    for spec in deployment.specs if deployment is not None else ():
        if (spec.role != "prefill" and not spec.switchable   # a switchable one may turn prefill
                and getattr(args, f"{spec.role}_kv_cache_memory", None) is None):
            spec.config = capped(spec.role, spec.config)
    for note in notes.values():
        print(note, flush=True)
    return config, deployment
