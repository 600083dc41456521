"""Clients that hang up: their requests are aborted and every KV block comes back."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def _aborted(served) -> float:
    text = httpx.get(f"{served.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "distserve:request_success_total" and \
                    s.labels.get("finished_reason") == "abort":
                return s.value
    return 0.0


async def _burst(url: str, n: int) -> list[str]:
    """n concurrent streams (completions and chat); every other one leaves after 3 events.

    Stream 1 asks for 3 choices, so leaving aborts n // 2 + 2 engine requests in all.
    """
    async def one(c: httpx.AsyncClient, i: int) -> str:
        sampling = {"max_tokens": 200, "temperature": 0.8, "seed": i, "ignore_eos": True,
                    "stream": True, "n": 3 if i == 1 else 1}
        if i % 4 < 2:
            path, body = "/v1/completions", {"prompt": f"Story number {i}:", **sampling}
        else:
            path, body = "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"Tell story {i}"}], **sampling}
        leave = i % 2 == 1
        events = 0
        async with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if leave and events >= 3:
                    return "left"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "done"
                json.loads(line[6:])
        return "cut"

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(n))), 60)


@pytest.mark.slow
def test_burst_with_disconnects_frees_every_block(served):
    before = _aborted(served)
    results = asyncio.run(_burst(served.url, 16))
    assert results.count("left") == 8 and results.count("done") == 8
    served.wait_idle(timeout=15)
    assert _aborted(served) - before == 10  # 197 tokens short: none can finish first
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "still here?",
                                                         "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_that_hangs_up_is_aborted(served):
    """The client hangs up once all 8 choices run (not after a fixed time: a fast machine
    could finish them first, a slow one not have started them)."""
    before = _aborted(served)
    body = {"prompt": "Once", "n": 8, "max_tokens": 480, "ignore_eos": True,
            "temperature": 1.0, "seed": 5}

    async def post_then_hang_up() -> None:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            task = asyncio.ensure_future(c.post("/v1/completions", json=body))
            deadline = asyncio.get_running_loop().time() + 30
            while served.client.stats().num_running < 8:
                assert not task.done(), "the request ended before all its choices ran"
                assert asyncio.get_running_loop().time() < deadline, "the choices never all ran"
                await asyncio.sleep(0.005)
            task.cancel()   # closes the connection mid-request
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(post_then_hang_up())
    served.wait_idle(timeout=15)
    assert _aborted(served) - before == 8  # every choice stopped, none ran to the end
