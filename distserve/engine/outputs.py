"""What an engine step reports for each request it touched: small typed records."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None          # "stop" | "length" | "abort"
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float]] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # timestamps (time.monotonic) for metrics
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    extra: dict = field(default_factory=dict)
