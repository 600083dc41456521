"""LongBench-like summarisation workload, synthesised: LongBench itself has no offline copy.

Prompts are an instruction plus an excerpt of real English prose that ships with every CPython:
the language reference in `pydoc_data.topics` (79 documents, about 465,000 characters), cut to
a seeded target length. Lengths follow the artifact's LongBench preparation: most prompts just
under the cap (1,900-2,048 tokens, less the answer), a quarter shorter, about 1,700 tokens on
average; outputs are short, about 90 tokens on average. Every result says it is synthetic."""

from __future__ import annotations

import random

from distserve.bench.workload import BenchRequest, Workload, WorkloadError, fits

INSTRUCTION = "Summarize the following documentation in a few sentences.\n\n"
TRAILER = "\n\nSummary:"
NOTE = ("synthetic LongBench-like summarisation: excerpts of the Python language reference "
        "(pydoc_data.topics, shipped with CPython), not LongBench itself")
LONG_SHARE = 0.75        # share of prompts drawn just under the cap, as the artifact truncated
LONG_RANGE = (1900, 2048)
SHORT_RANGE = (600, 1900)
OUTPUT_SHAPE, OUTPUT_SCALE = 2.0, 45.0   # gamma: mean 90 tokens
OUTPUT_RANGE = (4, 512)
HEADROOM = 8             # the artifact kept prompt + answer <= 2040 with a 2048 cap


def corpus_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise WorkloadError("this Python lacks pydoc_data (the text source of --dataset longbench)") from exc
    return [topics[key] for key in sorted(topics)]


_CORPUS_CACHE: dict[int, tuple] = {}


def _corpus_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """All documents' token ids end to end, and where each document starts; cached per
    tokenizer object (held in the cache, so its id cannot be reused)."""
    cached = _CORPUS_CACHE.get(id(tokenizer))
    if cached is not None:
        return cached[1], cached[2]
    ids: list[int] = []
    starts: list[int] = []
    for doc in corpus_documents():
        starts.append(len(ids))
        ids.extend(tokenizer.encode(doc + "\n\n"))
    _CORPUS_CACHE.clear()
    _CORPUS_CACHE[id(tokenizer)] = (tokenizer, ids, starts)
    return ids, starts


def _excerpt(ids, start: int, length: int) -> list[int]:
    """`length` tokens from `start`, wrapping round the corpus."""
    out = list(ids[start:start + length])
    while len(out) < length:
        out.extend(ids[: length - len(out)])
    return out


def make_request(tokenizer, ids, starts, rng: random.Random, max_total_len: int) -> BenchRequest:
    output_len = int(min(max(round(rng.gammavariate(OUTPUT_SHAPE, OUTPUT_SCALE)), OUTPUT_RANGE[0]),
                         OUTPUT_RANGE[1]))
    lo, hi = LONG_RANGE if rng.random() < LONG_SHARE else SHORT_RANGE
    target = min(rng.randint(lo, hi), max_total_len - HEADROOM - output_len)
    frame = len(tokenizer.encode(INSTRUCTION + TRAILER))
    body = max(target - frame, 1)
    start = rng.choice(starts)
    while True:
        prompt = INSTRUCTION + tokenizer.decode(_excerpt(ids, start, body)) + TRAILER
        input_len = len(tokenizer.encode(prompt))
        # decode then encode can merge or split tokens at the edges: shrink until it fits
        if input_len <= target or body <= 1:
            return BenchRequest(prompt, input_len, output_len)
        body -= input_len - target


def workload(tokenizer, num_prompts: int, seed: int, max_total_len: int = 2048) -> Workload:
    if max_total_len <= 2 * HEADROOM + OUTPUT_RANGE[1]:
        raise WorkloadError(f"--max-total-len {max_total_len} too small for the longbench workload")
    ids, starts = _corpus_tokens(tokenizer)
    rng = random.Random(seed)
    requests = []
    while len(requests) < num_prompts:
        request = make_request(tokenizer, ids, starts, rng, max_total_len)
        if fits(request.input_len, request.output_len, max_total_len):
            requests.append(request)
    return Workload("longbench", requests, NOTE, {"synthetic": True, "max_total_len": max_total_len,
                                                   "corpus_tokens": len(ids)})
