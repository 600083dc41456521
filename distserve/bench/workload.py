"""What a benchmark sends: requests with their token lengths, the tokenizer that measured
them, the dispatch by dataset name, and the length statistics that `--dry-run` prints.

Never talks to a server: a workload is built offline from files and packages."""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np

DATASETS = ("sharegpt", "humaneval", "longbench", "random", "jsonl")
DEFAULT_MAX_TOTAL_LEN = 2048
DEFAULT_NUM_PROMPTS = 1000  # vllm bench serve's default; a jsonl trace defaults to all its lines
MIN_LEN = 4


@dataclass
class BenchRequest:
    """One request of a workload: the prompt text and its lengths in the served model's tokens."""

    prompt: str
    input_len: int
    output_len: int


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    note: str = ""
    params: dict = field(default_factory=dict)


class WorkloadError(ValueError):
    """A workload that cannot be built from what the user gave (path, lengths, dataset)."""


def fits(input_len: int, output_len: int, max_total_len: int) -> bool:
    """The paper's artifact filter: both sides at least 4 tokens, prompt + output under the cap
    (dropped when the sum reaches it: OPT's 2048 positions)."""
    return input_len >= MIN_LEN and output_len >= MIN_LEN and input_len + output_len < max_total_len


def package_data(package: str, *parts: str) -> pathlib.Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise WorkloadError(f"{path} not found in package {package!r}")
    return path


@functools.lru_cache(maxsize=4)
@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str | None = None):
    """The tokenizer named by `spec` (a local folder, a .gguf file, or a hub name already in
    the local cache); None or "default" is the project's built-in SmolLM2 tokenizer. Cached:
    loading takes seconds."""
    from distserve.tokenizer import load_tokenizer as project_loader

    try:
        if spec in (None, "default") or os.path.exists(spec):
            return project_loader(spec)
        import transformers

        return transformers.AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # any loader failure becomes one clear message
        raise WorkloadError(f"cannot load tokenizer {spec!r}: {exc}") from exc


def tokenizer_spec(tokenizer: str | None, model: str | None) -> str | None:
    """--tokenizer if given, else the --model value when it is a local path, else the default."""
    if tokenizer:
        return tokenizer
    if model and os.path.exists(model):
        return model
    return None


def build_workload(name: str, tokenizer, num_prompts: int | None, seed: int, **options) -> Workload:
    """The `num_prompts` requests of dataset `name`, sampled with `seed`."""
    if num_prompts is None and name != "jsonl":
        num_prompts = DEFAULT_NUM_PROMPTS
    if num_prompts is not None and num_prompts < 1:
        raise WorkloadError(f"--num-prompts must be >= 1, got {num_prompts}")
    if name == "sharegpt":
        from distserve.bench import sharegpt

        return sharegpt.workload(tokenizer, num_prompts, seed, path=options.get("dataset_path"),
                                 max_total_len=options.get("max_total_len", DEFAULT_MAX_TOTAL_LEN))
    if name == "humaneval":
        from distserve.bench import humaneval

        return humaneval.workload(tokenizer, num_prompts, seed, path=options.get("dataset_path"),
                                  max_total_len=options.get("max_total_len", DEFAULT_MAX_TOTAL_LEN))
    if name == "longbench":
        from distserve.bench import longbench

        return longbench.workload(tokenizer, num_prompts, seed,
                                  max_total_len=options.get("max_total_len", DEFAULT_MAX_TOTAL_LEN))
    if name == "random":
        from distserve.bench import synthetic

        return synthetic.random_workload(
            tokenizer, num_prompts, seed, input_len=options.get("random_input_len", 1024),
            output_len=options.get("random_output_len", 128),
            range_ratio=options.get("random_range_ratio", 0.0))
    if name == "jsonl":
        from distserve.bench import synthetic

        if not options.get("dataset_path"):
            raise WorkloadError("--dataset jsonl needs --dataset-path FILE.jsonl")
        return synthetic.jsonl_workload(tokenizer, num_prompts, seed, options["dataset_path"])
    raise WorkloadError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def length_stats(requests: list[BenchRequest]) -> dict:
    """Count and distribution of input and output lengths, for --dry-run and the result JSON."""
    out: dict = {"count": len(requests)}
    for key in ("input_len", "output_len"):
        values = np.array([getattr(r, key) for r in requests], dtype=float)
        if values.size == 0:
            out[key] = None
            continue
        out[key] = {
            "mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
            "min": int(values.min()), "max": int(values.max()), "total": int(values.sum()),
        }
    return out


def format_length_stats(workload: Workload, bins: int = 8, width: int = 40) -> str:
    """The dry-run report: summary statistics and a text histogram of each length."""
    stats = length_stats(workload.requests)
    lines = [f"Dataset: {workload.name} ({stats['count']} requests)"]
    if workload.note:
        lines.append(f"Note: {workload.note}")
    for key, label in (("input_len", "Input tokens"), ("output_len", "Output tokens")):
        s = stats[key]
        if s is None:
            continue
        lines.append(f"{label}: mean {s['mean']:.1f}, median {s['median']:.0f}, P90 {s['p90']:.0f}, "
                     f"P99 {s['p99']:.0f}, min {s['min']}, max {s['max']}, total {s['total']}")
        values = [getattr(r, key) for r in workload.requests]
        counts, edges = np.histogram(values, bins=bins)
        top = max(int(counts.max()), 1)
        for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
            bar = "#" * round(width * int(count) / top)
            lines.append(f"  {lo:7.0f} - {hi:7.0f} | {bar} {int(count)}")
    return "\n".join(lines)
