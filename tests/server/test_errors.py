"""Client mistakes get a 4xx in OpenAI's error shape, never a 500, and nothing leaks."""
from __future__ import annotations

import httpx
import pytest

LONG = "word " * 600  # more tokens than the tiny model's 512-token context


def _post(served, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", timeout=30, **kwargs)


def _assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": 3.5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10 ** 9]}, "vocabulary"),
    ({"prompt": LONG}, "context"),
    ({"prompt": "hi", "max_tokens": 600}, "context"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "presence_penalty": 1.0}, "presence_penalty"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
])
def test_completion_bad_parameters_are_400(served, body, needle):
    err = _assert_error(_post(served, "/v1/completions", json=body), 400)
    assert needle in err["message"] or needle == err.get("param")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": LONG}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3},
])
def test_chat_bad_parameters_are_400(served, body):
    _assert_error(_post(served, "/v1/chat/completions", json=body), 400)


def test_malformed_json_and_wrong_content(served):
    for content in (b"{not json", b"", b"[1, 2]", b"\xff\xfe"):
        _assert_error(_post(served, "/v1/completions", content=content,
                            headers={"content-type": "application/json"}), 400)


def test_unknown_model_and_route_are_404(served):
    err = _assert_error(_post(served, "/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
                        404)
    assert err["code"] == "model_not_found"
    _assert_error(httpx.get(f"{served.url}/v1/nothing-here"), 404)
    _assert_error(httpx.get(f"{served.url}/v1/completions"), 405)


def test_bad_request_id_header(served):
    _assert_error(_post(served, "/v1/completions", json={"prompt": "x"},
                        headers={"X-Request-Id": "a" * 500}), 400)


def test_api_key(keyed):
    url = f"{keyed.url}/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        err = _assert_error(httpx.post(url, json=body, headers=headers), 401)
        assert err["code"] == "invalid_api_key"
    # The key is checked before the body, so a keyless client learns about the key first.
    _assert_error(httpx.post(url, content=b"{", headers={"content-type": "application/json"}),
                  401)
    ok = httpx.post(url, json=body, headers={"Authorization": "Bearer sesame"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # ops routes stay open
    assert httpx.get(f"{keyed.url}/metrics").status_code == 200


def test_neutral_and_unknown_fields_are_accepted(served):
    r = _post(served, "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logit_bias": {},
                                               "best_of": 1, "some_new_field": 3})
    assert r.status_code == 200, r.text


def test_rejected_requests_leave_nothing_behind(served):
    served.wait_idle()
