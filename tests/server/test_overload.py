"""Overload: past --max-queued-requests a request gets 429 with Retry-After in the OpenAI error
shape, nothing it started is left running, and the count shows on /metrics."""
from __future__ import annotations

import asyncio

import httpx


def _is_busy(r: httpx.Response) -> bool:
    if r.status_code != 429:
        return False
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "too_many_requests"
    assert int(r.headers["retry-after"]) >= 1
    return True


def test_more_choices_than_the_queue_holds_is_429_and_starts_nothing(bounded):
    r = httpx.post(f"{bounded.url}/v1/completions", timeout=30,
                   json={"prompt": "hi", "max_tokens": 4, "n": 3})
    assert _is_busy(r)
    bounded.wait_idle()
    assert bounded.app.state.admission.waiting == 0
    assert 'distserve:requests_rejected_busy{model_name="tiny"} 1.0' in httpx.get(f"{bounded.url}/metrics").text
    ok = httpx.post(f"{bounded.url}/v1/completions", timeout=30,
                    json={"prompt": "hi", "max_tokens": 4, "n": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_a_burst_is_served_or_refused_and_the_queue_empties(bounded):
    async def burst():
        async with httpx.AsyncClient(base_url=bounded.url, timeout=60) as http:
            body = {"prompt": "a long enough prompt " * 20, "max_tokens": 8, "ignore_eos": True}
            return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(24)])

    replies = asyncio.run(burst())
    served = [r for r in replies if r.status_code == 200]
    busy = [r for r in replies if _is_busy(r)]
    assert len(served) + len(busy) == len(replies) and served
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in served)
    bounded.wait_idle()
    assert bounded.app.state.admission.waiting == 0
