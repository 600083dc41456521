"""Decode steps replayed from CUDA graphs, one graph per batch size in a short list.

Why: a decode step launches a few kernels per layer, each tiny at small batches, and on a GPU
the launches (Python, dispatch, the driver) outlast the work: vLLM and SGLang capture decode
steps for this reason. A graph is captured once at start-up for each size; a step with n
requests replays the smallest graph of at least n rows, its inputs copied into the graph's
static buffers. The rows past n repeat row 0 whole (its token, position, cache slot and block
table), so they write the same K/V into the same slot and harm nothing. A graph ends at the
hidden states: the logits of the n real rows are computed after it, eagerly, so no graph keeps
a [size, vocab] buffer of its own and the caller gets a tensor no later replay overwrites.

`capture=False` runs the same buffers and padding eagerly: how the tests check this logic on
machines without a GPU (nothing is faster that way).
"""
from __future__ import annotations

import torch
from torch import nn

from distserve.engine.batch import Batch, prepare
from distserve.models.attention import AttentionMetadata

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, block_size: int,
                 max_model_len: int, max_batch: int, capture: bool = True) -> None:
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.sizes = sorted({s for s in CAPTURE_SIZES if s < max_batch} | {min(max_batch, CAPTURE_SIZES[-1])})
        rows, device = self.sizes[-1], kv_cache.device
        self.width = -(-max_model_len // block_size)   # the longest block table
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(rows, **long)
        self.positions = torch.zeros(rows, **long)
        self.slot_blocks = torch.zeros(rows, **long)
        self.slot_offsets = torch.zeros(rows, **long)
        self.block_tables = torch.zeros(rows, self.width, **long)
        self.context_lens = torch.ones(rows, **long)
        self.capture = capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}   # size -> (graph, hidden)
        self.steps: dict[int, int] = {}    # steps run, by graph size

    def size_for(self, n: int) -> int | None:
        """The batch size whose graph runs n decodes; None if n is past the largest."""
        return next((s for s in self.sizes if s >= n), None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """One graph per size, the largest first so the smaller ones reuse its memory. Call at
        start-up, before any request owns a block: a capture's warm-up run writes K/V into
        block 0, as the engine's own warm-up does."""
        if not self.capture:
            return
        device = self.kv_cache.device
        with torch.cuda.device(device):
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(device)   # one side stream for every warm-up run
            for size in reversed(self.sizes):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):   # compiles kernels and settles the allocator
                    self._hidden(size)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self._hidden(size)
                self.graphs[size] = (graph, hidden)
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor | None:
        """The logits [n, vocab] of a decode-only batch; None where no graph fits it (it has
        prefills, more requests than the largest graph, or a longer block table)."""
        n = len(batch.decodes)
        size = self.size_for(n)
        if batch.prefills or not n or size is None or any(len(r.block_table) > self.width
                                                           for r in batch.decodes):
            return None
        self._fill(batch, size)
        self.steps[size] = self.steps.get(size, 0) + 1
        if not self.capture:
            hidden = self._hidden(size)
        else:
            graph, hidden = self.graphs[size]
            with torch.cuda.device(self.kv_cache.device):
                graph.replay()
        return self.model.compute_logits(hidden[:n])

    def _fill(self, batch: Batch, size: int) -> None:
        """The padded batch's inputs, as the eager path prepares them, into the static
        buffers. Only the block table columns in use are copied: attention reads no entry past
        a context's last block, so older ones left further right are never read."""
        padded = Batch(decodes=batch.decodes + [batch.decodes[0]] * (size - len(batch.decodes)))
        x = prepare(padded, self.block_size, torch.device("cpu"))
        tables = x.meta.decode_block_tables
        self.input_ids[:size].copy_(x.input_ids)
        self.positions[:size].copy_(x.positions)
        self.slot_blocks[:size].copy_(x.meta.slot_blocks)
        self.slot_offsets[:size].copy_(x.meta.slot_offsets)
        self.block_tables[:size, :tables.shape[1]].copy_(tables)
        self.context_lens[:size].copy_(x.meta.decode_context_lens)

    def _hidden(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_blocks=self.slot_blocks[:size], slot_offsets=self.slot_offsets[:size], prefills=[],
            num_prefill_tokens=0, decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size])
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
