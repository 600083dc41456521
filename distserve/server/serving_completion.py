"""POST /v1/completions: prompts (text or token ids) x n choices, whole or streamed."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from distserve.engine.async_engine import EngineClient
from distserve.server.admission import Admission
from distserve.server.errors import bad_request
from distserve.server.generation import (SSE_DONE, Choices, ChoiceState, SSEResponse,
                                         sse, sse_guard)
from distserve.server.metrics import ServerMetrics
from distserve.server.prompts import PromptEncoder
from distserve.server.protocol import CompletionRequest, now


@dataclass
class PromptInfo:
    num_tokens: int
    echo: str  # the prompt's text when the body asked for echo, else ""


class CompletionService:
    def __init__(self, client: EngineClient, model_name: str, metrics: ServerMetrics,
                 encoder: PromptEncoder, admission: Admission | None = None) -> None:
        self.client = client
        self.admission = admission
        self.model_name = model_name
        self.metrics = metrics
        self.encoder = encoder

    async def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
            return await self.encoder.encode(prompt)
        return list(prompt)

    def _token_str(self, token_id: int) -> str:
        return self.client.tokenizer.decode([token_id])

    async def start(self, body: CompletionRequest,
                    request_id: str) -> tuple[Choices, list[PromptInfo]]:
        """Validates everything, then submits every choice (or none: 400 before any work)."""
        prompts = body.prompts()
        body.check_n(len(prompts))
        for p in prompts:  # all refused at once, before any is tokenised
            if isinstance(p, str):
                self.encoder.check_length(len(p), "prompt")
        ids = [await self._encode(p) for p in prompts]
        params = [body.sampling_params(body.max_tokens, body.logprobs, i)
                  for i in range(body.n)]
        choices = Choices(self.metrics, self.admission)
        for p, prompt_ids in enumerate(ids):
            for i in range(body.n):
                await choices.submit(self.client, prompt_ids, params[i],
                                     f"{request_id}-{p * body.n + i}")
        return choices, [PromptInfo(len(x), self._echo_text(p, x) if body.echo else "")
                         for p, x in zip(prompts, ids, strict=True)]

    def _echo_text(self, prompt: str | list[int], ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.client.tokenizer.decode(ids)

    def stream_response(self, body: CompletionRequest, choices: Choices,
                        prompts: list[PromptInfo], response_id: str) -> SSEResponse:
        events = sse_guard(self._stream(body, choices, prompts, response_id))
        return SSEResponse(events, choices)

    async def full(self, body: CompletionRequest, choices: Choices,
                   prompts: list[PromptInfo], response_id: str) -> JSONResponse:
        """Waits for every choice, then answers with one body (the non-streaming case)."""
        states = await choices.run_to_end()
        out = []
        for state in states:
            echo = prompts[state.index // body.n].echo
            text = echo + "".join(state.text)
            out.append({"index": state.index, "text": text,
                        "logprobs": self._logprobs(state, body.logprobs, len(echo), 0),
                        "finish_reason": state.finish_reason, "stop_reason": None})
        prompt_tokens = sum(p.num_tokens for p in prompts)
        return JSONResponse({"id": response_id, "object": "text_completion", "created": now(),
                             "model": self.model_name, "choices": out,
                             "usage": choices.usage(prompt_tokens)})

    async def _stream(self, body: CompletionRequest, choices: Choices,
                      prompts: list[PromptInfo], response_id: str) -> AsyncIterator[str]:
        created = now()
        sent_echo: set[int] = set()
        offsets = [0] * len(choices.states)
        extra = {"usage": None} if body.include_usage else {}
        async with aclosing(choices.outputs()) as outputs:
            async for state, out in outputs:
                text = out.new_text
                if state.index not in sent_echo:
                    sent_echo.add(state.index)
                    text = prompts[state.index // body.n].echo + text
                if not text and not out.finished and body.logprobs is None:
                    continue  # the detokeniser is holding back half a character
                lp = None
                if body.logprobs is not None:
                    lp = self._logprobs(state, body.logprobs, offsets[state.index],
                                        len(state.token_ids) - len(out.new_token_ids))
                offsets[state.index] += len(text)
                choice = {"index": state.index, "text": text, "logprobs": lp,
                          "finish_reason": out.finish_reason if out.finished else None,
                          "stop_reason": None}
                yield sse({"id": response_id, "object": "text_completion", "created": created,
                           "model": self.model_name, "choices": [choice], **extra})
        if body.include_usage:
            yield sse({"id": response_id, "object": "text_completion", "created": created,
                       "model": self.model_name, "choices": [],
                       "usage": choices.usage(sum(p.num_tokens for p in prompts))})
        yield SSE_DONE

    def _logprobs(self, state: ChoiceState, k: int | None, offset: int, start: int) -> dict | None:
        """OpenAI's completions logprobs for the tokens from `start` on, text from `offset`."""
        if k is None:
            return None
        tokens, top, offsets = [], [], []
        for pos in range(start, len(state.token_ids)):
            tid = state.token_ids[pos]
            tok = self._token_str(tid)
            tokens.append(tok)
            offsets.append(offset)
            offset += len(tok)
            entry = {self._token_str(t): lp for t, lp in state.top_logprobs[pos].items()} \
                if pos < len(state.top_logprobs) else {}
            entry.setdefault(tok, state.logprobs[pos])
            top.append(entry)
        return {"tokens": tokens, "token_logprobs": state.logprobs[start:],
                "top_logprobs": top, "text_offset": offsets}
