"""An asyncio front for a synchronous engine: the server awaits, one thread steps the engine.

The engine is not thread-safe, so exactly one background thread touches it: it applies the
add/abort commands that the event loop puts on a thread-safe queue, runs `step()`, and hands
each step's outputs back to the loop with `call_soon_threadsafe`. When it has no work it
sleeps on the command queue (no spinning). `EngineClient` is the interface the HTTP server
sees; the disaggregated controller implements the same one over several instance processes.
This module never speaks HTTP.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from distserve.cluster.messages import EngineStats, RequestOutput, predicted_ttft
from distserve.request import SamplingParams, fit_to_context

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or a step raised); no request can run."""


class RequestFailed(RuntimeError):
    """This request alone failed inside the engine (finish_reason "error"); others run on."""


@runtime_checkable
class EngineClient(Protocol):
    """What a front end needs from whatever runs the requests (one engine or a cluster)."""

    model_name: str
    tokenizer: Any
    max_model_len: int   # prompt + generated tokens one request may hold

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> RequestStream: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    @property
    def is_healthy(self) -> bool: ...


_CLOSED = object()  # put on a stream's queue by aclose(), to end a pending __anext__


class RequestStream:
    """One request's outputs as an async iterator that aborts the request if left early.

    `on_close(request_id, finished)` runs exactly once: when the last output was read, when
    an error ended the request, or when the consumer closes, is cancelled or drops it.
    """

    def __init__(self, request_id: str, outputs: asyncio.Queue,
                 on_close: Callable[[str, bool], None]) -> None:
        self.request_id = request_id
        self._outputs = outputs
        self._on_close: Callable[[str, bool], None] | None = on_close

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._on_close is None:
            raise StopAsyncIteration
        try:
            item = await self._outputs.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._close(finished=False)
            raise
        if item is _CLOSED:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._close(finished=True)  # the engine side has already dropped it
            raise item
        if item.finish_reason == "error":
            self._close(finished=True)
            raise RequestFailed(f"request {self.request_id} failed: "
                                f"{item.extra.get('error', 'in the engine')}")
        if item.finished:
            self._close(finished=True)
        return item

    def _close(self, finished: bool) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self.request_id, finished)

    async def aclose(self) -> None:
        if self._on_close is not None:
            self._outputs.put_nowait(_CLOSED)  # wakes a consumer waiting in another task
        self._close(finished=False)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._close(finished=False)  # only queue puts: safe from a finaliser


_STOP = ("stop",)


class AsyncEngine:
    """Runs an `Engine` (anything with its add/abort/step/stats contract) in a thread."""

    def __init__(self, engine, idle_poll_s: float = 0.05) -> None:
        self.engine = engine
        self.model_name: str = engine.model_name
        # The loop thread encodes prompts while the engine thread decodes outputs: give each
        # thread its own tokenizer object so the Rust tokenizer is never shared between them.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        # the smaller of the model's context and the KV cache's (a request must fit alone)
        self.max_model_len: int = engine.max_model_len
        self._idle_poll_s = idle_poll_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = EngineStats()
        self._error: BaseException | None = None
        self._stopped = False
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- event-loop side
    @property
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopped

    def stats(self) -> EngineStats:
        """The numbers after the last step (a snapshot: never reads the engine itself)."""
        return self._stats

    def predict_ttft(self, num_tokens: int) -> float | None:
        """Queueing plus prefill of a new prompt, at the speed its last prompts ran."""
        s = self._stats
        return predicted_ttft(s.queued_tokens, num_tokens, s.prefill_seconds_per_token)

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Raises ValueError for a request that can never run; fills in max_tokens if unset."""
        return fit_to_context(prompt_ids, params, self.max_model_len, self.engine.vocab_size)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> RequestStream:
        """Submits a request and returns the stream of its outputs, the last one `finished`.

        Raises ValueError (before anything runs) for a request that can never run. Closing
        the stream early (aclose, `async with`, cancellation, or dropping it) aborts the
        request and frees its blocks.
        """
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running") from self._error
        ids = self.encode(prompt)
        params = self.check_request(ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._streams and not self._loop.is_closed():
                raise RuntimeError("an AsyncEngine serves one event loop at a time")
            self._loop = loop
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        self._commands.put(("add", request_id, ids, params, time.monotonic()))
        return RequestStream(request_id, outputs, self._forget)

    def _forget(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Stops a request and frees its blocks; its stream ends with finish_reason 'abort'."""
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop thread; running requests end with EngineDeadError."""
        self._commands.put(_STOP)
        self._thread.join(timeout)

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:  # None: the consumer already left
                stream.put_nowait(item)

    def _send(self, items: list) -> None:
        if items and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished
                if not self._apply_commands(block=idle):
                    break
                if not self.engine.has_unfinished:
                    continue
                outputs = self.engine.step().outputs
                self._publish_stats()  # first: a consumer woken by its last output sees its blocks freed
                self._send([(o.request_id, o) for o in outputs])
                if not outputs and self._stats.num_running == 0:
                    # Work is waiting but none could be admitted; wait for a command
                    # instead of spinning (check_request makes this unreachable).
                    if not self._apply_commands(block=True, timeout=self._idle_poll_s):
                        break
        except BaseException as e:  # a bug in a step: fail every request, stay visible
            log.exception("engine loop failed")
            self._error = e
        finally:
            self._stopped = True
            self._fail_all(self._error)

    def _apply_commands(self, block: bool, timeout: float | None = None) -> bool:
        """Applies queued commands (waiting for one when `block`); False means stop."""
        try:
            cmd = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        replies: list = []
        while True:
            if cmd is _STOP:
                self._send(replies)
                return False
            self._apply(cmd, replies)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        self._publish_stats()
        self._send(replies)
        return True

    def _apply(self, cmd: tuple, replies: list) -> None:
        if cmd[0] == "add":
            _, request_id, ids, params, arrival = cmd
            try:
                self.engine.add(ids, params, request_id=request_id, arrival_time=arrival)
            except ValueError as e:
                replies.append((request_id, e))
        else:
            out = self.engine.abort(cmd[1])
            if out is not None:
                replies.append((cmd[1], out))

    def _fail_all(self, cause: BaseException | None) -> None:
        """Frees every request's blocks and ends every open stream, queued adds included."""
        for request_id in list(getattr(self.engine, "requests", {})):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may be broken; the streams still get an answer
                log.exception("abort of %s failed", request_id)
        self._publish_stats()
        error = EngineDeadError("the engine stopped" + (f": {cause}" if cause else ""))
        error.__cause__ = cause
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._fail_streams, error)
            except RuntimeError:
                pass

    def _fail_streams(self, error: EngineDeadError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    def _publish_stats(self) -> None:
        self._stats = self.engine.stats()
