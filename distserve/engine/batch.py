"""One step's work as plain rows: what every worker of an instance needs to run it.

The scheduler's requests stay with the engine; a worker gets only the rows (the tokens to
compute, their positions and block tables) and builds the model's input tensors from them.
A tensor- or pipeline-parallel instance sends the rows to its workers as one int64 tensor
(`encode` / `decode`): no pickle, one broadcast per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distserve.models.attention import AttentionMetadata, PrefillSegment
from distserve.request import Request


@dataclass
class PrefillRow:
    token_ids: list[int]      # the prompt tokens computed in this step (a chunk, or all)
    start: int                # position of the first of them (tokens already in the cache)
    block_table: list[int]
    sampled: bool             # the chunk ends the prompt: its last token's logits are sampled


@dataclass
class DecodeRow:
    token_id: int             # the last generated token, computed in this step
    context_len: int          # tokens in the cache after this step
    block_table: list[int]


@dataclass
class Batch:
    prefills: list[PrefillRow] = field(default_factory=list)
    decodes: list[DecodeRow] = field(default_factory=list)

    @classmethod
    def of(cls, prefills: list[tuple[Request, int]], decodes: list[Request]) -> Batch:
        rows = [PrefillRow(r.all_token_ids[r.num_computed_tokens:r.num_computed_tokens + n],
                           r.num_computed_tokens, list(r.block_table),
                           r.num_computed_tokens + n == r.num_tokens) for r, n in prefills]
        return cls(rows, [DecodeRow(r.all_token_ids[-1], r.num_tokens, list(r.block_table))
                          for r in decodes])

    @property
    def num_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prefills) + len(self.decodes)

    @property
    def num_sampled(self) -> int:
        return sum(p.sampled for p in self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


@dataclass
class ModelInputs:
    input_ids: torch.Tensor   # [T]
    positions: torch.Tensor   # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [S] rows of the hidden states whose logits are sampled


def prepare(batch: Batch, block_size: int, device: torch.device) -> ModelInputs:
    """The model's inputs for `batch`: prefill segments first, then one token per decode."""
    if batch.decodes and not batch.prefills:
        return _prepare_decodes(batch.decodes, block_size, device)
    return _prepare_any(batch, block_size, device)


def _prepare_any(batch: Batch, block_size: int, device: torch.device) -> ModelInputs:
    bs = block_size
    ids: list[int] = []
    segments: list[PrefillSegment] = []
    slot_parts: list[torch.Tensor] = []
    pos_parts: list[torch.Tensor] = []
    logit_rows: list[int] = []
    for row in batch.prefills:
        start, c, n = len(ids), row.start, len(row.token_ids)
        ids.extend(row.token_ids)
        table = torch.tensor(row.block_table, dtype=torch.long)
        p = torch.arange(c, c + n)
        pos_parts.append(p)
        slot_parts.append(table[p // bs])
        segments.append(PrefillSegment(start, n, c + n, table.to(device)))
        if row.sampled:
            logit_rows.append(start + n - 1)
    num_prefill = len(ids)
    decode_tables = decode_lens = None
    if batch.decodes:
        width = max(len(r.block_table) for r in batch.decodes)
        padded = torch.zeros(len(batch.decodes), width, dtype=torch.long)
        for i, r in enumerate(batch.decodes):
            padded[i, :len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.long)
            logit_rows.append(len(ids))
            ids.append(r.token_id)
        lens = torch.tensor([r.context_len for r in batch.decodes], dtype=torch.long)
        pos_parts.append(lens - 1)
        slot_parts.append(padded.gather(1, ((lens - 1) // bs)[:, None])[:, 0])
        decode_tables, decode_lens = padded.to(device), lens.to(device)
    positions = torch.cat(pos_parts)
    meta = AttentionMetadata(
        slot_blocks=torch.cat(slot_parts).to(device),
        slot_offsets=(positions % bs).to(device),
        prefills=segments,
        num_prefill_tokens=num_prefill,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
    )
    return ModelInputs(torch.tensor(ids, dtype=torch.long, device=device), positions.to(device),
                       meta, torch.tensor(logit_rows, dtype=torch.long, device=device))


def _prepare_decodes(rows: list[DecodeRow], block_size: int, device: torch.device) -> ModelInputs:
    """prepare's inputs for a decode-only batch, as views of one tensor built from one list.
    Why: a decode step runs right after the previous one streamed the weights through every
    cache, so each torch op here costs 10-20x what it does warm; the general path's ~20 ops
    took ~0.22 ms of SmolLM2's batch-1 step (AMD Zen 4)."""
    n, width = len(rows), max(len(r.block_table) for r in rows)
    positions = [r.context_len - 1 for r in rows]
    flat = [r.token_id for r in rows] + positions
    flat += [r.block_table[p // block_size] for r, p in zip(rows, positions)]
    flat += [p % block_size for p in positions]
    flat += [r.context_len for r in rows] + list(range(n))
    for r in rows:
        flat += r.block_table
        flat += [0] * (width - len(r.block_table))
    data = torch.tensor(flat, dtype=torch.long, device=device)
    ids, pos, slot_blocks, slot_offsets, lens, logit_rows = data[:6 * n].view(6, n).unbind(0)
    meta = AttentionMetadata(slot_blocks=slot_blocks, slot_offsets=slot_offsets, prefills=[],
                             num_prefill_tokens=0, decode_block_tables=data[6 * n:].view(n, width),
                             decode_context_lens=lens)
    return ModelInputs(ids, pos, meta, logit_rows)


def warm_up_batches(num_tokens: int, block_size: int) -> list[Batch]:
    """One prefill of `num_tokens` and one decode step after it, in scratch blocks.

    The scratch K/V lands in the first blocks, which nobody owns yet; a request that later
    gets them writes each slot before reading it.
    """
    table = list(range(num_tokens // block_size + 1))  # + the decode slot
    return [Batch([PrefillRow([0] * num_tokens, 0, table, True)]),
            Batch(decodes=[DecodeRow(0, num_tokens + 1, table)])]


def split_micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """At most `parts` batches of near-equal token counts, for the stages of a pipeline.

    Prompts (whole rows: a chunk is never cut) go greedily to the lightest batch, longest
    first, the paper's "batches of near-equal token counts"; decode rows are dealt out evenly.
    Order inside each batch follows the input, so the sampled rows keep a fixed order.
    """
    parts = max(1, min(parts, len(batch.prefills) + len(batch.decodes)))
    if parts == 1:
        return [batch]
    loads = [0] * parts
    owner: dict[int, int] = {}
    for i in sorted(range(len(batch.prefills)), key=lambda i: -len(batch.prefills[i].token_ids)):
        k = loads.index(min(loads))
        owner[i] = k
        loads[k] += len(batch.prefills[i].token_ids)
    out = [Batch() for _ in range(parts)]
    for i, row in enumerate(batch.prefills):
        out[owner[i]].prefills.append(row)
    for row in batch.decodes:
        k = loads.index(min(loads))
        out[k].decodes.append(row)
        loads[k] += 1
    return [b for b in out if not b.is_empty]


# ---------------------------------------------------------------- the wire form
def encode(batches: list[Batch]) -> torch.Tensor:
    """[num_batches, then per batch: num_prefills, num_decodes, then per prefill row: start,
    num_tokens, sampled, num_blocks, tokens, blocks; per decode row: token, context_len,
    num_blocks, blocks] as one int64 tensor."""
    flat: list[int] = [len(batches)]
    for b in batches:
        flat += (len(b.prefills), len(b.decodes))
        for p in b.prefills:
            flat += (p.start, len(p.token_ids), int(p.sampled), len(p.block_table))
            flat += p.token_ids
            flat += p.block_table
        for d in b.decodes:
            flat += (d.token_id, d.context_len, len(d.block_table))
            flat += d.block_table
    return torch.tensor(flat, dtype=torch.long)


def decode(data: torch.Tensor) -> list[Batch]:
    flat = data.tolist()
    pos = 1
    batches = []
    for _ in range(flat[0]):
        num_prefills, num_decodes = flat[pos], flat[pos + 1]
        pos += 2
        b = Batch()
        for _ in range(num_prefills):
            start, n, sampled, nb = flat[pos:pos + 4]
            pos += 4
            b.prefills.append(PrefillRow(flat[pos:pos + n], start, flat[pos + n:pos + n + nb],
                                         bool(sampled)))
            pos += n + nb
        for _ in range(num_decodes):
            token, ctx, nb = flat[pos:pos + 3]
            pos += 3
            b.decodes.append(DecodeRow(token, ctx, flat[pos:pos + nb]))
            pos += nb
        batches.append(b)
    return batches
