"""Picks the next token of each request from its logits: greedy, temperature, top-k, top-p.

A request with a seed draws each token from its own generator, seeded from the seed and the
token's position: its output depends neither on what else is in the batch nor on where its
earlier tokens were drawn (a prefill instance, a decode instance, a run before a failure).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import logging

import torch

from distserve.models import paged_kernel
from distserve.request import Request

log = logging.getLogger(__name__)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None          # of the chosen tokens, when any request asked
    top_logprobs: list[dict[int, float]] | None
    errors: dict[int, str] = field(default_factory=dict)   # row -> why it has no token


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A seed for the token at `position` of a seeded request (splitmix64 of both)."""
    x = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _draw(probs: torch.Tensor, req: Request) -> int:
    g = req.generator
    if g is None:
        return int(torch.multinomial(probs, 1)[0])
    g.manual_seed(position_seed(req.sampling_params.seed,
                                req.num_resumed_tokens + len(req.output_token_ids)))
    return int(torch.multinomial(probs.cpu(), 1, generator=g)[0])   # a CPU generator


def sample(logits: torch.Tensor, requests: list[Request]) -> SampleResult:
    """logits [N, vocab], one row per request, in the same order, in the model's dtype:
    greedy requests pick from them as they are, everything else works in float32. Should the
    batch fail, each row is sampled alone, and a row that fails alone is that request's
    error (`errors`), never the step's."""
    try:
        return _sample_batch(logits, requests)
    except Exception:
        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(_sample_batch(logits[i:i + 1], [req]))
            except Exception as e:
                log.exception("sampling request %s failed", req.request_id)
                rows.append(SampleResult([-1], None, None, {0: f"{type(e).__name__}: {e}"}))
        return _concat(rows)


def _concat(rows: list[SampleResult]) -> SampleResult:
    with_lp = any(r.logprobs is not None for r in rows)
    return SampleResult(
        [r.token_ids[0] for r in rows],
        [r.logprobs[0] if r.logprobs else 0.0 for r in rows] if with_lp else None,
        [r.top_logprobs[0] if r.top_logprobs else {} for r in rows] if with_lp else None,
        {i: r.errors[0] for i, r in enumerate(rows) if r.errors})


def _sample_batch(logits: torch.Tensor, requests: list[Request]) -> SampleResult:
    params = [r.sampling_params for r in requests]
    want = [p.logprobs for p in params]
    # the common case, in plain Python: no copy of the logits, and no torch op, each of which
    # costs 10-20x after a decode step has streamed the weights through every cache
    if all(p.greedy and w is None for p, w in zip(params, want)):
        return SampleResult(_argmax(logits).tolist(), None, None)
    greedy = torch.tensor([p.greedy for p in params])
    all_greedy = bool(greedy.all())
    logits = logits.float()
    if all_greedy:
        chosen = _argmax(logits)
    else:
        chosen = torch.empty(len(requests), dtype=torch.long)
        if greedy.any():
            chosen[greedy] = _argmax(logits[greedy])
        idx = (~greedy).nonzero()[:, 0]
        probs = _filtered_probs(logits[idx], [params[i] for i in idx.tolist()])
        # a row with NaN or inf (the model's numbers, not the request's settings) would make
        # torch.multinomial raise and fail the whole batch: that request alone picks greedily
        usable = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
        for row, i in enumerate(idx.tolist()):
            if usable[row]:
                chosen[i] = _draw(probs[row], requests[i])
            else:
                chosen[i] = _argmax(logits[i:i + 1])[0]
    if all(w is None for w in want):
        return SampleResult(chosen.tolist(), None, None)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    top: list[dict[int, float]] = []
    k = max(w or 0 for w in want)
    if k:
        vals, ids = logprobs.topk(k, dim=-1)
    for i, w in enumerate(want):
        top.append({} if not w else dict(zip(ids[i, :w].tolist(), vals[i, :w].tolist())))
    return SampleResult(chosen.tolist(), chosen_lp, top)


def _filtered_probs(logits: torch.Tensor, params) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    logits = logits / temps
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[-1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_ks])[:, None]
        sorted_logits = logits.sort(dim=-1, descending=True).values
        kth = sorted_logits.gather(1, (ks.clamp(max=vocab) - 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], dtype=logits.dtype)[:, None]
    if (top_ps < 1.0).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        cum_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = cum_before >= top_ps  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Where each row first reaches its maximum (a NaN counts as the maximum), as
    torch.max(dim=-1).indices gives it; our CPU kernel reads bf16 rows as they are, ~10x
    faster than torch.max over their float32 copy (csrc/argmax.cpp)."""
    if (logits.device.type == "cpu" and logits.dim() == 2 and logits.is_contiguous()
            and logits.shape[1] > 0 and paged_kernel.kernel_available()):
        out = torch.empty(logits.shape[0], dtype=torch.long)
        torch.ops.distserve_cpu.argmax_rows(out, logits)
        return out
    return logits.max(dim=-1).indices
