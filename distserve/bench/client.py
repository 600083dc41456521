"""Async streaming client for any OpenAI-compatible server: /v1/completions (or
/v1/chat/completions), one request at a time, timestamps of every streamed chunk.

Every outcome becomes a RequestRecord: an HTTP error, a broken connection, a malformed SSE
line, an error object inside the stream, a stream that stops before `data: [DONE]`, or a
timeout is a failure with its message, never an exception to the caller."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from distserve.bench.metrics import RequestRecord


class StreamError(Exception):
    """The server answered, but not with a well-formed successful stream."""


def error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, or the start of the body."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return json.dumps(obj)[:200]


def build_payload(model: str, prompt: str, max_tokens: int, chat: bool = False,
                  ignore_eos: bool = False) -> dict:
    payload = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}}
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _chunk_text(obj: dict, chat: bool) -> tuple[bool, str]:
    """(whether this chunk carries a token, its text). None does: a chunk without choices (the
    usage chunk), a completion chunk holding only a finish_reason, a chat chunk without
    content (the opening role-only delta). A completion chunk with empty text still does, as
    in vllm bench serve: a token whose bytes do not yet form a character."""
    choices = obj.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return False, ""
    choice = choices[0]
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        return bool(text), text
    text = choice.get("text") or ""
    return bool(text) or choice.get("finish_reason") is None, text


async def _stream(client: httpx.AsyncClient, url: str, payload: dict, headers: dict,
                  record: RequestRecord, start: float, chat: bool, count_tokens) -> None:
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            raise StreamError(f"HTTP {resp.status_code}: {error_message(await resp.aread())}")
        first = last = None
        texts: list[str] = []
        usage_tokens = None
        done = False
        async for raw in resp.aiter_lines():
            now = time.perf_counter()
            line = raw.strip()
            if not line or line.startswith(":"):
                continue  # blank separator or SSE comment (keep-alive)
            if not line.startswith("data:"):
                raise StreamError(f"malformed SSE line: {line[:80]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                raise StreamError(f"malformed SSE chunk (not JSON): {data[:80]!r}") from None
            if not isinstance(obj, dict):
                raise StreamError(f"malformed SSE chunk (not an object): {data[:80]!r}")
            if obj.get("error"):
                raise StreamError(f"error in stream: {error_message(data.encode())}")
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                usage_tokens = usage["completion_tokens"]
            is_token, text = _chunk_text(obj, chat)
            if not is_token:
                continue
            if first is None:
                first = now
                record.ttft = now - start
            else:
                record.itl.append(now - last)
            last = now
            texts.append(text)
        end = time.perf_counter()
        record.e2el = end - start
        if first is None:
            raise StreamError("no token received" + ("" if done else " (stream ended without [DONE])"))
        record.last_token_time = last - start
        if usage_tokens is not None:
            record.output_len = usage_tokens
        elif count_tokens is not None:
            record.output_len = count_tokens("".join(texts))
        else:
            record.output_len = len(texts)
        if not done:
            raise StreamError(f"stream ended without [DONE] after {len(texts)} chunks")


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, input_len: int,
                       headers: dict | None = None, timeout: float | None = None,
                       chat: bool = False, count_tokens=None) -> RequestRecord:
    """Send one streaming request; the record says how it went, whatever happened."""
    record = RequestRecord(input_len=input_len, expected_output_len=payload["max_tokens"])
    start = time.perf_counter()
    try:
        await asyncio.wait_for(
            _stream(client, url, payload, headers or {}, record, start, chat, count_tokens), timeout)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout:g} s"
    except StreamError as exc:
        record.error = str(exc)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if record.e2el is None:  # a failure: how long it took to fail
        record.e2el = time.perf_counter() - start
    record.success = not record.error
    return record


async def server_info(client: httpx.AsyncClient, base_url: str, headers: dict | None = None) -> dict:
    """GET /v1/models: the served model ids and, where the server says, its GPU count.
    Raises httpx.HTTPError when the server cannot be reached."""
    resp = await client.get(f"{base_url}/v1/models", headers=headers or {}, timeout=10.0)
    info: dict = {"models": [], "num_gpus": None, "status": resp.status_code}
    if resp.status_code != 200:
        info["error"] = f"HTTP {resp.status_code}: {error_message(resp.content)}"
        return info
    try:
        entries = resp.json().get("data") or []
    except (json.JSONDecodeError, AttributeError):
        entries = []
    for entry in entries:
        if isinstance(entry, dict):
            info["models"].append(entry.get("id"))
            if isinstance(entry.get("num_gpus"), int) and entry["num_gpus"] > 0:
                info["num_gpus"] = entry["num_gpus"]
    return info
