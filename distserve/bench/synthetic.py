"""Synthetic and user-given workloads: `random` (vllm bench serve's random dataset: prompts of
random token ids, lengths fixed or drawn from [len * (1 - ratio), len * (1 + ratio)]) and
`jsonl` (one {"prompt": str, "output_len": int} object per line: a custom trace, sent in file
order, cycled when more requests are asked than it holds)."""

from __future__ import annotations

import json

import numpy as np

from distserve.bench.workload import BenchRequest, Workload, WorkloadError


def _length_range(length: int, ratio: float, what: str) -> tuple[int, int]:
    if length < 1:
        raise WorkloadError(f"--random-{what}-len must be >= 1, got {length}")
    if not 0.0 <= ratio < 1.0:
        raise WorkloadError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    return max(1, int(np.floor(length * (1 - ratio)))), int(np.ceil(length * (1 + ratio)))


def _vocab(tokenizer) -> np.ndarray:
    size = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return np.array([i for i in range(size) if i not in special])


def random_prompt(tokenizer, vocab: np.ndarray, length: int, rng: np.random.Generator) -> tuple[str, int]:
    """A prompt of random tokens that re-encodes to `length` tokens or very near it; returns the
    prompt and its true length."""
    ids = rng.choice(vocab, size=length).tolist()
    prompt = tokenizer.decode(ids)
    for _ in range(3):
        encoded = tokenizer.encode(prompt)
        if len(encoded) == length:
            break
        if len(encoded) > length:
            encoded = encoded[:length]
        else:
            encoded = encoded + rng.choice(vocab, size=length - len(encoded)).tolist()
        prompt = tokenizer.decode(encoded)
    return prompt, len(tokenizer.encode(prompt))


def random_workload(tokenizer, num_prompts: int, seed: int, input_len: int = 1024,
                    output_len: int = 128, range_ratio: float = 0.0) -> Workload:
    in_lo, in_hi = _length_range(input_len, range_ratio, "input")
    out_lo, out_hi = _length_range(output_len, range_ratio, "output")
    rng = np.random.default_rng(seed)
    vocab = _vocab(tokenizer)
    requests = []
    for _ in range(num_prompts):
        prompt, true_len = random_prompt(tokenizer, vocab, int(rng.integers(in_lo, in_hi + 1)), rng)
        requests.append(BenchRequest(prompt, true_len, int(rng.integers(out_lo, out_hi + 1))))
    return Workload("random", requests, "random token ids",
                    {"input_len": input_len, "output_len": output_len, "range_ratio": range_ratio})


def load_jsonl(path: str) -> list[tuple[str, int]]:
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WorkloadError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
                prompt, out = (obj.get("prompt"), obj.get("output_len")) if isinstance(obj, dict) else (None, None)
                if not isinstance(prompt, str) or isinstance(out, bool) or not isinstance(out, int) or out < 1:
                    raise WorkloadError(f"{path}:{lineno}: expected {{\"prompt\": str, \"output_len\": int >= 1}}")
                items.append((prompt, out))
    except OSError as exc:
        raise WorkloadError(f"cannot read {path}: {exc}") from exc
    if not items:
        raise WorkloadError(f"{path}: no requests")
    return items


def jsonl_workload(tokenizer, num_prompts: int | None, seed: int, path: str) -> Workload:
    del seed  # a trace is replayed in its own order
    items = load_jsonl(path)
    num_prompts = num_prompts or len(items)
    measured = [BenchRequest(p, len(tokenizer.encode(p)), n) for p, n in items]
    requests = [measured[i % len(measured)] for i in range(num_prompts)]
    return Workload("jsonl", requests, f"{len(items)} requests from {path}", {"path": path})
