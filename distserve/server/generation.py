"""What completions and chat share: submitting choices, interleaving them, SSE framing.

Every request submitted here is owned by a `Choices` object whose `close()` aborts whatever
has not finished, so a client that leaves (or a handler that fails half-way) never leaves
work running or KV blocks held.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.responses import StreamingResponse

from distserve.cluster.messages import RequestOutput
from distserve.engine.async_engine import EngineClient, RequestStream
from distserve.request import SamplingParams
from distserve.server.admission import Admission
from distserve.server.errors import APIError, as_api_error, sse_error
from distserve.server.metrics import RequestTracker, ServerMetrics


@dataclass
class ChoiceState:
    """What one choice has produced so far (for the final body and the usage numbers)."""

    index: int
    num_prompt_tokens: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs or [])
        self.top_logprobs.extend(out.new_top_logprobs or [])
        self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


class Choices:
    """The engine requests behind one HTTP request, one per (prompt, n) pair."""

    def __init__(self, metrics: ServerMetrics, admission: Admission | None = None) -> None:
        self.metrics = metrics
        self.admission = admission
        self.streams: list[RequestStream] = []
        self.states: list[ChoiceState] = []
        self.trackers: list[RequestTracker] = []
        self.waiting: list[bool] = []   # per choice: admitted, no output yet

    async def submit(self, client: EngineClient, prompt_ids: list[int],
                     params: SamplingParams, request_id: str) -> None:
        """Starts one choice; on a bad request (or a full queue: 429) the ones already
        started are aborted."""
        try:
            if self.admission is not None:
                if not self.streams and hasattr(client, "predict_ttft"):   # once per HTTP request
                    self.admission.check_late(client.predict_ttft(len(prompt_ids)))
                self.admission.admit()
            try:
                stream = await client.generate(prompt_ids, params, request_id)
            except BaseException:
                if self.admission is not None:
                    self.admission.started()
                raise
        except BaseException as e:
            await self.close()
            raise (as_api_error(e) if isinstance(e, Exception) else e) from e
        self.waiting.append(self.admission is not None)
        self.streams.append(stream)
        self.states.append(ChoiceState(len(self.states), len(prompt_ids)))
        self.trackers.append(self.metrics.track())

    def _started(self, index: int) -> None:
        if self.waiting[index]:
            self.waiting[index] = False
            self.admission.started()

    async def close(self) -> None:
        for index in range(len(self.waiting)):
            self._started(index)
        for stream, state in zip(self.streams, self.states, strict=True):
            if state.finish_reason is None:
                state.finish_reason = "abort"
                self.metrics.finished("abort")
            await stream.aclose()  # a no-op for a request that finished

    async def outputs(self) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        """Outputs of all choices as they come, each recorded in its state and the metrics."""
        pairs = _single(self.streams[0]) if len(self.streams) == 1 else _merge(self.streams)
        async with aclosing(pairs):  # closing us must stop _merge's tasks now, not at GC
            async for index, out in pairs:
                self._started(index)
                self.trackers[index].observe(out)
                self.states[index].add(out)
                yield self.states[index], out

    async def run_to_end(self) -> list[ChoiceState]:
        """Every choice to its end; a request lost on the way (its instance died with none
        to take over) is an HTTP error in the OpenAI shape (503), not a traceback."""
        try:
            async with aclosing(self.outputs()) as outputs:
                async for _ in outputs:
                    pass
        except Exception as e:
            raise as_api_error(e) from None
        finally:
            await self.close()
        return self.states

    def usage(self, prompt_tokens: int) -> dict:
        completion = sum(s.num_output_tokens for s in self.states)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


async def _single(stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput]]:
    async for out in stream:
        yield 0, out


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several streams; the first error ends the lot."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                merged.put_nowait((index, out))
        except Exception as e:
            merged.put_nowait((index, e))
        merged.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends a stream with an error event and [DONE] when the engine fails mid-way."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as e:
        err = as_api_error(e) if not isinstance(e, APIError) else e
        yield sse_error(err)
        yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream whose requests are aborted however the response ends.

    Starlette cancels the body on a client disconnect but does not close it, and a body that
    never started would not run its own cleanup: so close both here.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], choices: Choices) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self._events = events
        self._choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._choices.close()


async def cancel_on_disconnect(receive, work):
    """Runs `work` (a coroutine) unless the client hangs up first, then cancels it.

    Starlette does not notice a vanished client for a plain (non-streaming) response, and a
    long generation would run to the end for nobody.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


class ClientGone(Exception):
    """The client hung up before its answer was ready; nobody reads what we send back."""
