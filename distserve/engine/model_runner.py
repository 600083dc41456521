"""Turns a scheduled batch into tensors, runs the model and returns the logits to sample.

Knows nothing of queues or HTTP: requests in, logits out.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distserve.engine.batch import Batch, prepare, warm_up_batches
from distserve.engine.cuda_graphs import DecodeGraphs
from distserve.models import triton_attention
from distserve.request import Request

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    logits: torch.Tensor | None        # [N, vocab] in the model dtype, one row per sampled request
    sampled: list[Request]             # requests whose last token was computed this step


def sampled_requests(prefills: list[tuple[Request, int]], decodes: list[Request]) -> list[Request]:
    """The requests whose logits a step returns, in the order of its rows."""
    return [r for r, n in prefills if r.num_computed_tokens + n == r.num_tokens] + list(decodes)


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        # called as on_step(start, end, prefills, decodes) after each run (a step trace)
        self.on_step: Callable | None = None
        self.graphs: DecodeGraphs | None = None   # CUDA: decode steps replayed (use_graphs)

    @torch.inference_mode()
    def run(self, prefills: list[tuple[Request, int]], decodes: list[Request]) -> StepResult:
        start = time.monotonic()
        sampled = sampled_requests(prefills, decodes)
        logits = self.run_batch(Batch.of(prefills, decodes))
        if self.on_step is not None:
            if logits is not None and logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            self.on_step(start, time.monotonic(), prefills, decodes)
        return StepResult(logits, sampled)

    @torch.inference_mode()
    def run_batch(self, batch: Batch) -> torch.Tensor | None:
        if self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        x = prepare(batch, self.block_size, self.device)
        if batch.num_sampled and hasattr(self.model, "sampled_logits"):   # one call: see llama.py
            return self.model.sampled_logits(x.input_ids, x.positions, self.kv_cache, x.meta,
                                             x.logit_rows)
        hidden = self.model(x.input_ids, x.positions, self.kv_cache, x.meta)
        return self.model.compute_logits(hidden[x.logit_rows]) if batch.num_sampled else None

    @functools.cached_property
    def can_decode_ahead(self) -> bool:
        """Can `decode_ahead` run here: a model with that one call (llama.py greedy_ahead, on
        our CPU kernels), whole in this worker, and no CUDA graphs. Fixed once the model is
        loaded and packed and the graphs captured (before any step): asked once."""
        check = getattr(self.model, "can_decode_ahead", None)
        return self.graphs is None and check is not None and check(self.kv_cache)

    @torch.inference_mode()
    def decode_ahead(self, decodes: list[Request], steps: list[int]) -> list[list[int]]:
        """The next max(steps) greedy tokens of each request of a decode-only batch in one call,
        of which request i's first steps[i] count (can_decode_ahead must hold, and each block
        table must hold those slots). Its step trace is the engine's: see Engine._decode_ahead."""
        x = prepare(Batch.of([], decodes), self.block_size, self.device)
        last_lens = torch.tensor([r.num_tokens + n - 1 for r, n in zip(decodes, steps)],
                                 dtype=torch.long, device=self.device)
        return self.model.greedy_ahead(x.input_ids, self.kv_cache, x.meta, max(steps), last_lens).tolist()

    def use_graphs(self, max_model_len: int, max_batch: int) -> bool:
        """Capture decode steps in CUDA graphs, where the attention reads the cache through
        the block tables (Triton): the torch path gathers whole padded tables, and a graph's
        table is as wide as the longest request could need."""
        if not triton_attention.available(self.device, self.block_size, self.kv_cache.dtype):
            return False
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_model_len, max_batch)
        try:
            self.graphs.capture_all()
        except Exception as exc:   # out of memory, an op that cannot be captured, ...
            log.warning("capturing decode steps in CUDA graphs failed (%s): they run eagerly", exc)
            self.graphs = None
            torch.cuda.synchronize(self.device)
            return False
        return True

    @torch.inference_mode()
    def warm_up(self, num_tokens: int) -> None:
        """One prefill of `num_tokens` and one decode step, before any request is admitted.

        The first pass at a size pays for thread start-up, kernel selection and faulting in
        activation memory: 0.7 s more than a warm 1700-token prefill here, enough to miss a
        TTFT SLO.
        """
        if num_tokens >= 1:
            for batch in warm_up_batches(num_tokens, self.block_size):
                self.run_batch(batch)
