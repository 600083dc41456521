"""The OpenAI wire format: request bodies as pydantic models, responses as plain dicts.

Pydantic checks types (a wrong type is a 400); value ranges are checked once, by
SamplingParams, whose ValueError messages name the bad value. Unknown fields are ignored,
as OpenAI clients send many; known fields we cannot honour are refused, not ignored.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from distserve.request import INT64, SamplingParams
from distserve.server.errors import bad_request

MAX_CHOICES = 64  # prompts x n in one body: each becomes its own request in the engine

# Fields that clients send and that would change the answer if honoured: refused unless left
# at their neutral value, so nobody gets silently different output from what they asked.
_NEUTRAL = {"logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []),
            "functions": (None, []), "tool_choice": (None, "none", "auto"),
            "response_format": (None, {"type": "text"}), "best_of": (None, 1),
            "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0),
            "min_tokens": (None, 0), "use_beam_search": (None, False),
            "prompt_logprobs": (None,), "guided_json": (None,), "guided_regex": (None,),
            "guided_choice": (None,), "guided_grammar": (None,)}


class StreamOptions(BaseModel):
    include_usage: bool = False


def _first_unencodable(value, path: str = "body") -> str | None:
    """Where the body holds text that is not Unicode (a lone UTF-16 surrogate such as
    "\\ud800", which JSON allows): no tokenizer or response encoder can take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _first_unencodable(key, path) or _first_unencodable(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_unencodable(item, f"{path}[{i}]")
            if found:
                return found
    return None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data):
        where = _first_unencodable(data)
        if where:
            raise ValueError(f"{where} holds text that is not valid Unicode "
                             "(a lone UTF-16 surrogate)")
        return data

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        choice: int) -> SamplingParams:
        """The engine's settings for one choice; a seed is shifted so n>1 choices differ."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported (got {getattr(self, name)}); "
                                  "leave it at 0", name)
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL and value not in _NEUTRAL[name]:
                raise bad_request(f"{name} is not supported by this server (got {value!r})",
                                  name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                max_tokens=max_tokens, stop=self.stop or [],
                stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                seed=None if self.seed is None else _shifted_seed(self.seed, choice),
                logprobs=logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:
            raise bad_request(str(e)) from e

    def check_n(self, num_prompts: int = 1) -> None:
        if self.n < 1:
            raise bad_request(f"n must be >= 1, got {self.n}", "n")
        if self.n * num_prompts > MAX_CHOICES:
            raise bad_request(f"{num_prompts} prompt(s) x n={self.n} asks for more than "
                              f"{MAX_CHOICES} completions in one request", "n")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _shifted_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped within int64 so that the largest valid seed stays valid;
    an out-of-range seed is left as it is, for SamplingParams to refuse by name."""
    if not INT64[0] <= seed <= INT64[1]:
        return seed
    return (seed + choice - INT64[0]) % 2**64 + INT64[0]


# StrictInt keeps a list of numbers from being read as text (or text as token ids).
PromptType = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = 16   # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg = {"role": "system" if self.role == "developer" else self.role,
               "content": content or ""}
        if self.name:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


# ---------------------------------------------------------------- responses (plain dicts)
def now() -> int:
    return int(time.time())


def model_card(name: str, max_model_len: int, created: int, root: str | None = None) -> dict:
    """root: the model's folder or file (vLLM's convention: clients load its tokenizer from
    there); the served name where none is known."""
    return {"id": name, "object": "model", "created": created, "owned_by": "distserve",
            "root": root or name, "parent": None, "max_model_len": max_model_len}
