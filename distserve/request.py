"""A request's sampling settings, state, tokens and timestamps.

Shared by every engine loop (colocated, prefill, decode); it holds no tensors but its
optional sampling generator, and never talks to the network.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

# Below this a temperature is greedy, as in vLLM: dividing logits by 1e-40 in float32 gives
# inf and NaN, and sampling from those would fail the whole batch.
GREEDY_TEMPERATURE = 1e-5
INT64 = (-2**63, 2**63 - 1)   # seeds: what torch.Generator and msgpack both carry
INT32_MAX = 2**31 - 1         # token ids and top_k: more than any vocabulary
MAX_STOP_STRINGS = 64         # each is searched for after every token
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, with OpenAI / vLLM field names and defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Every value an engine, a generator or the wire could not carry is refused here,
        by name: nothing out of range may reach an instance."""
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k == 0:
            self.top_k = -1
        if not (self.top_k == -1 or 1 <= self.top_k <= INT32_MAX):
            raise ValueError(f"top_k must be -1 (disabled) or between 1 and {INT32_MAX}, "
                             f"got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.seed is not None and not INT64[0] <= self.seed <= INT64[1]:
            raise ValueError(f"seed must be between {INT64[0]} and {INT64[1]}, got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"a stop string may have at most {MAX_STOP_STRING_CHARS} "
                                 f"characters, got one of {len(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, "
                             f"got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            if not 0 <= t <= INT32_MAX:
                raise ValueError(f"stop token id {t} is not a token id (0 to {INT32_MAX})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # decode: first token out elsewhere, KV not pulled yet
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"    # this request alone failed (its sampling raised); the stream raises


class Request:
    """One generation: prompt, produced tokens, KV block table and timing."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[dict[int, float]] = []
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are already in the cache
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_preemptions = 0
        self.num_resumed_tokens = 0   # a re-run: outputs of the earlier run, now in the prompt
        self.generator = None  # a torch.Generator when the request has its own seed
        if sampling_params.seed is not None:
            import torch  # here, so that the planner can use requests without torch
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling_params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int, logprob: float | None, now: float) -> None:
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
                f"out={len(self.output_token_ids)}, {self.status.value})")


def fit_to_context(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                   vocab_size: int | None = None) -> SamplingParams:
    """Refuses (ValueError) a request that can never run in a context of `max_model_len`
    tokens; fills in max_tokens, when unset, with the room that is left."""
    import dataclasses

    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= max_model_len:
        raise ValueError(f"the prompt has {n} tokens; this server's context is "
                         f"{max_model_len} tokens, including at least one generated")
    if vocab_size is not None:
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary "
                             f"(size {vocab_size})")
    if params.max_tokens is None:
        return dataclasses.replace(params, max_tokens=max_model_len - n)
    if n + params.max_tokens > max_model_len:
        raise ValueError(f"this server's context is {max_model_len} tokens, but "
                         f"{n + params.max_tokens} were asked for ({n} in the prompt, "
                         f"{params.max_tokens} to generate); lower max_tokens")
    return params
