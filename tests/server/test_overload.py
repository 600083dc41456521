"""Overload: past --max-queued-requests a request gets 429 with Retry-After in the OpenAI error
shape, nothing it started is left running, and the count shows on /metrics; with
--reject-late, so does a request whose predicted TTFT is over the SLO."""
from __future__ import annotations

import asyncio

import httpx
import pytest


def _is_busy(r: httpx.Response, code: str = "too_many_requests") -> bool:
    if r.status_code != 429:
        return False
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == code
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


def test_reject_late_refuses_what_cannot_meet_the_ttft_slo(late):
    body = {"prompt": "a prompt of some length " * 10, "max_tokens": 2}
    first = httpx.post(f"{late.url}/v1/completions", timeout=30, json=body)
    assert first.status_code == 200          # nothing measured yet: admitted
    assert late.client.predict_ttft(40) > 1e-6
    again = httpx.post(f"{late.url}/v1/completions", timeout=30, json=body)
    assert _is_busy(again, "slo_unattainable") and "TTFT SLO" in again.json()["error"]["message"]
    assert 'distserve:requests_rejected_late{model_name="tiny"} 1.0' in httpx.get(f"{late.url}/metrics").text
    late.wait_idle()


def test_the_late_check_admits_what_is_predicted_in_time_or_unknown():
    from distserve.server.admission import Admission
    from distserve.server.errors import APIError
    admission = Admission(late_after_s=1.0)
    admission.check_late(None)
    admission.check_late(0.99)
    with pytest.raises(APIError) as e:
        admission.check_late(1.5)
    assert e.value.status == 429 and admission.num_rejected_late == 1
    Admission(late_after_s=None).check_late(100.0)   # without --reject-late: never
