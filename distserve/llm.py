"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from tqdm import tqdm

from distserve.config import EngineConfig
from distserve.engine.engine import Engine
from distserve.request import SamplingParams


@dataclass
class CompletionResult:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]            # the generated tokens only
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    metrics: dict = field(default_factory=dict)


class LLM:
    """Runs prompts to completion on one colocated instance in this process."""

    def __init__(self, model: str | None = None, **options) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown LLM option(s) {sorted(unknown)}; known: {sorted(known)}")
        self.engine = Engine(EngineConfig(model=model, **options))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stops the workers of a parallel instance (nothing to do for one worker)."""
        self.engine.executor.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        return cls(**{f.name: getattr(config, f.name) for f in fields(EngineConfig)})

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[CompletionResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        reqs = [self.engine.add(p, sp) for p, sp in zip(prompts, params)]
        results: dict[str, CompletionResult] = {}
        texts = {r.request_id: [] for r in reqs}
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished:
            for out in self.engine.step().outputs:
                texts[out.request_id].append(out.new_text)
                if out.finished:
                    bar.update(1)
        bar.close()
        for r in reqs:
            results[r.request_id] = CompletionResult(
                prompt_token_ids=r.prompt_token_ids,
                text="".join(texts[r.request_id]),
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason.value if r.finish_reason else None,
                logprobs=list(r.output_logprobs) if r.sampling_params.logprobs is not None else None,
                top_logprobs=list(r.output_top_logprobs) if r.sampling_params.logprobs else None,
                metrics={"arrival_time": r.arrival_time, "first_token_time": r.first_token_time,
                         "last_token_time": r.last_token_time,
                         "num_preemptions": r.num_preemptions},
            )
        return [results[r.request_id] for r in reqs]
