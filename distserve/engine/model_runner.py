"""Turns a scheduled batch into tensors, runs the model and returns the logits to sample.

Knows nothing of queues or HTTP: requests in, logits out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distserve.models.attention import AttentionMetadata, PrefillSegment
from distserve.request import Request


@dataclass
class StepResult:
    logits: torch.Tensor | None        # [N, vocab] in the model dtype, one row per sampled request
    sampled: list[Request]             # requests whose last token was computed this step


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        # called as on_step(start, end, prefills, decodes) after each run (a step trace)
        self.on_step: Callable | None = None

    @torch.inference_mode()
    def run(self, prefills: list[tuple[Request, int]], decodes: list[Request]) -> StepResult:
        start = time.monotonic()
        input_ids, positions, meta, logit_rows, sampled = self._prepare(prefills, decodes)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        logits = self.model.compute_logits(hidden[logit_rows]) if sampled else None
        if self.on_step is not None:
            if logits is not None and logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            self.on_step(start, time.monotonic(), prefills, decodes)
        return StepResult(logits, sampled)

    @torch.inference_mode()
    def warm_up(self, num_tokens: int) -> None:
        """One prefill of `num_tokens` and one decode step, before any request is admitted.

        The first pass at a size pays for thread start-up, kernel selection and faulting in
        activation memory: 0.7 s more than a warm 1700-token prefill here, enough to miss a
        TTFT SLO. Scratch K/V lands in the first blocks, which nobody owns yet; a request
        that later gets them writes each slot before reading it.
        """
        if num_tokens < 1:
            return
        bs = self.block_size
        table = torch.arange(num_tokens // bs + 1, dtype=torch.long)  # + the decode slot
        positions = torch.arange(num_tokens)
        meta = AttentionMetadata(table[positions // bs].to(self.device), (positions % bs).to(self.device),
                                 [PrefillSegment(0, num_tokens, num_tokens, table.to(self.device))],
                                 num_tokens, None, None)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, positions.to(self.device), self.kv_cache, meta)
        self.model.compute_logits(hidden[-1:])
        step = torch.tensor([num_tokens], dtype=torch.long)
        meta = AttentionMetadata(table[step // bs].to(self.device), (step % bs).to(self.device), [], 0,
                                 table[None].to(self.device), (step + 1).to(self.device))
        hidden = self.model(ids[:1], step.to(self.device), self.kv_cache, meta)
        self.model.compute_logits(hidden)

    def _prepare(self, prefills, decodes):
        bs = self.block_size
        ids: list[int] = []
        segments: list[PrefillSegment] = []
        slot_parts: list[torch.Tensor] = []
        pos_parts: list[torch.Tensor] = []
        logit_rows: list[int] = []
        sampled: list[Request] = []
        for req, n in prefills:
            start, c = len(ids), req.num_computed_tokens
            ids.extend(req.all_token_ids[c:c + n])
            table = torch.tensor(req.block_table, dtype=torch.long)
            p = torch.arange(c, c + n)
            pos_parts.append(p)
            slot_parts.append(table[p // bs])
            segments.append(PrefillSegment(start, n, c + n, table.to(self.device)))
            if c + n == req.num_tokens:
                logit_rows.append(start + n - 1)
                sampled.append(req)
        num_prefill = len(ids)
        decode_tables = decode_lens = None
        if decodes:
            width = max(len(r.block_table) for r in decodes)
            padded = torch.zeros(len(decodes), width, dtype=torch.long)
            for row, r in enumerate(decodes):
                padded[row, :len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.long)
                logit_rows.append(len(ids))
                ids.append(r.all_token_ids[-1])
            sampled.extend(decodes)
            lens = torch.tensor([r.num_tokens for r in decodes], dtype=torch.long)
            pos_parts.append(lens - 1)
            slot_parts.append(padded.gather(1, ((lens - 1) // bs)[:, None])[:, 0])
            decode_tables, decode_lens = padded.to(self.device), lens.to(self.device)
        positions = torch.cat(pos_parts)
        meta = AttentionMetadata(
            slot_blocks=torch.cat(slot_parts).to(self.device),
            slot_offsets=(positions % bs).to(self.device),
            prefills=segments,
            num_prefill_tokens=num_prefill,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        return input_ids, positions.to(self.device), meta, rows, sampled
