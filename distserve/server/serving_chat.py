"""POST /v1/chat/completions: messages through the tokenizer's chat template, n choices."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse

from distserve.engine.async_engine import EngineClient
from distserve.server.admission import Admission
from distserve.server.generation import (SSE_DONE, Choices, ChoiceState, SSEResponse,
                                         sse, sse_guard)
from distserve.server.metrics import ServerMetrics
from distserve.server.prompts import PromptEncoder
from distserve.server.protocol import ChatCompletionRequest, now


class ChatService:
    def __init__(self, client: EngineClient, model_name: str, metrics: ServerMetrics,
                 encoder: PromptEncoder, admission: Admission | None = None) -> None:
        self.client = client
        self.admission = admission
        self.model_name = model_name
        self.metrics = metrics
        self.encoder = encoder

    async def start(self, body: ChatCompletionRequest, request_id: str) -> tuple[Choices, int]:
        """Validates everything, then submits every choice (or none: 400 before any work)."""
        body.check_n()
        ids = await self.encoder.encode_chat([m.as_template_dict() for m in body.messages],
                                             body.add_generation_prompt)
        logprobs = body.engine_logprobs()
        params = [body.sampling_params(body.requested_max_tokens(), logprobs, i)
                  for i in range(body.n)]
        choices = Choices(self.metrics, self.admission)
        for i in range(body.n):
            await choices.submit(self.client, ids, params[i], f"{request_id}-{i}")
        return choices, len(ids)

    async def full(self, body: ChatCompletionRequest, choices: Choices, prompt_tokens: int,
                   response_id: str) -> JSONResponse:
        """Waits for every choice, then answers with one body (the non-streaming case)."""
        states = await choices.run_to_end()
        out = [{"index": s.index,
                "message": {"role": "assistant", "content": "".join(s.text)},
                "logprobs": self._logprobs(s, body, 0),
                "finish_reason": s.finish_reason, "stop_reason": None} for s in states]
        return JSONResponse({"id": response_id, "object": "chat.completion", "created": now(),
                             "model": self.model_name, "choices": out,
                             "usage": choices.usage(prompt_tokens)})

    def stream_response(self, body: ChatCompletionRequest, choices: Choices,
                        prompt_tokens: int, response_id: str) -> SSEResponse:
        events = sse_guard(self._stream(body, choices, prompt_tokens, response_id))
        return SSEResponse(events, choices)

    async def _stream(self, body: ChatCompletionRequest, choices: Choices, prompt_tokens: int,
                      response_id: str) -> AsyncIterator[str]:
        created = now()
        extra = {"usage": None} if body.include_usage else {}

        def chunk(choice_list: list[dict], **more) -> str:
            return sse({"id": response_id, "object": "chat.completion.chunk",
                        "created": created, "model": self.model_name,
                        "choices": choice_list, **extra, **more})

        # The role goes first, at once, as OpenAI does: the client sees the stream open.
        for state in choices.states:
            yield chunk([{"index": state.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async with aclosing(choices.outputs()) as outputs:
            async for state, out in outputs:
                if not out.new_text and not out.finished and not body.logprobs:
                    continue  # the detokeniser is holding back half a character
                delta = {"content": out.new_text} if out.new_text else {}
                lp = self._logprobs(state, body, len(state.token_ids) - len(out.new_token_ids))
                yield chunk([{"index": state.index, "delta": delta, "logprobs": lp,
                              "finish_reason": out.finish_reason if out.finished else None}])
        if body.include_usage:
            yield chunk([], usage=choices.usage(prompt_tokens))
        yield SSE_DONE

    def _logprobs(self, state: ChoiceState, body: ChatCompletionRequest,
                  start: int) -> dict | None:
        if not body.logprobs:
            return None
        decode = self.client.tokenizer.decode

        def entry(token_id: int, logprob: float) -> dict:
            tok = decode([token_id])
            return {"token": tok, "logprob": logprob, "bytes": list(tok.encode("utf-8"))}

        content = []
        for pos in range(start, len(state.token_ids)):
            item = entry(state.token_ids[pos], state.logprobs[pos])
            top = state.top_logprobs[pos] if pos < len(state.top_logprobs) else {}
            item["top_logprobs"] = [entry(t, lp) for t, lp in top.items()]
            content.append(item)
        return {"content": content}
