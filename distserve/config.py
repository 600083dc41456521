"""Settings of an engine instance, as plain dataclasses that name and check their values."""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("prefill-first", "chunked")
KV_PULL_FAILURE = ("recompute", "rerun")
MAX_SCHEDULER_STEPS = 64   # tokens per call at most: a call holds off aborts and new requests


@dataclass
class EngineConfig:
    model: str | None = None            # None: the built-in SmolLM2-135M-Instruct
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    device: str | None = None           # None: cuda if present, else cpu
    block_size: int = 16                # tokens per KV block
    kv_cache_memory_gib: float = 2.0    # KV cache budget
    num_kv_blocks: int | None = None    # overrides the budget (tests, exact sizing)
    max_num_seqs: int = 256             # requests in one batch at most
    max_num_batched_tokens: int = 2048  # tokens in one step at most (a longer prompt runs alone)
    max_model_len: int | None = None    # default: the model's max positions
    policy: str = "prefill-first"       # prefill-first (vLLM default) | chunked (chunked prefill)
    num_threads: int | None = None      # torch intra-op threads on CPU
    seed: int = 0
    kv_checksum: bool = False           # prefill: checksum each block handed over; decode:
    #                                     verify after the pull (a bad block is never decoded)
    kv_pull_failure: str = "recompute"  # decode, after a pull failed twice: compute the
    #                                     prompt here, or rerun it through a prefill instance
    tensor_parallel_size: int = 1       # workers that split every layer (heads, FFN columns)
    pipeline_parallel_size: int = 1     # stages that split the layers
    enforce_eager: bool = False         # CUDA: no decode steps replayed from CUDA graphs
    num_scheduler_steps: int = 1        # greedy decode-only batches: tokens per executor call

    @property
    def num_workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.kv_pull_failure not in KV_PULL_FAILURE:
            raise ValueError(f"unknown kv_pull_failure {self.kv_pull_failure!r}; choose one of "
                             f"{', '.join(KV_PULL_FAILURE)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ValueError(f"num_scheduler_steps must be between 1 and {MAX_SCHEDULER_STEPS}, "
                             f"got {self.num_scheduler_steps}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_checksum and self.num_workers > 1:
            raise ValueError("kv_checksum is not supported yet for tensor- or pipeline-parallel "
                             "instances")
