"""Inputs that once took the whole service down: each is a 4xx (or served), and the server
stays healthy with every KV block back afterwards."""
from __future__ import annotations

import threading

import httpx
import pytest

from distserve.server.app import DEFAULT_MAX_BODY_BYTES


def _post(served, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", timeout=60, **kwargs)


def _assert_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert needle in err["message"], err


def _assert_still_serving(served) -> None:
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    r = _post(served, "/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                               "temperature": 0})
    assert r.status_code == 200, r.text
    served.wait_idle()


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6])
@pytest.mark.parametrize("stream", [False, True])
def test_a_tiny_temperature_is_served_greedily(served, temperature, stream):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True,
            "stream": stream}
    greedy = _post(served, "/v1/completions", json={**body, "stream": False, "temperature": 0})
    r = _post(served, "/v1/completions", json={**body, "temperature": temperature})
    assert r.status_code == 200, r.text
    assert "error" not in r.text
    if not stream:
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    _assert_still_serving(served)


@pytest.mark.parametrize("fields, needle", [
    ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"top_k": 2**64}, "top_k"),
    ({"stop_token_ids": [2**70]}, "stop token id"), ({"stop_token_ids": [-1]}, "stop token id"),
    ({"stop_token_ids": [10**6]}, "vocabulary"), ({"stop": ["x"] * 10_000}, "stop strings"),
    ({"max_tokens": 2**70}, "context"), ({"n": 2**70}, "n"), ({"logprobs": 2**70}, "logprobs"),
])
def test_out_of_range_numbers_are_400(served, fields, needle):
    _assert_error(_post(served, "/v1/completions", json={"prompt": "hi", **fields}), 400, needle)
    _assert_still_serving(served)


def test_the_largest_seed_with_several_choices_is_served(served):
    r = _post(served, "/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                               "seed": 2**63 - 1, "n": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", "temperature": Infinity}',
                                 b'{"prompt": "hi", "temperature": NaN}'])
def test_non_finite_temperature_is_400(served, raw):
    r = _post(served, "/v1/completions", content=raw,
              headers={"content-type": "application/json"})
    _assert_error(r, 400, "temperature")


@pytest.mark.parametrize("path, raw", [
    ("/v1/completions", b'{"prompt": "a\\ud800b"}'),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\udfff"]}'),
    ("/v1/completions", b'{"prompt": "hi", "\\ud800": 1}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
])
def test_a_lone_surrogate_is_400(served, path, raw):
    r = _post(served, path, content=raw, headers={"content-type": "application/json"})
    _assert_error(r, 400, "not valid Unicode")
    _assert_still_serving(served)


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    big = b'{"prompt": "' + b"a" * DEFAULT_MAX_BODY_BYTES + b'"}'
    _assert_error(_post(served, "/v1/completions", content=big,
                        headers={"content-type": "application/json"}), 413, "limit")
    _assert_still_serving(served)


def test_a_chunked_body_over_the_limit_is_413(served):
    def chunks():  # no Content-Length: the server has to count
        yield b'{"prompt": "'
        for _ in range(DEFAULT_MAX_BODY_BYTES // (1 << 16) + 1):
            yield b"a" * (1 << 16)
        yield b'"}'

    _assert_error(_post(served, "/v1/completions", content=chunks(),
                        headers={"content-type": "application/json"}), 413, "limit")
    _assert_still_serving(served)


def test_a_prompt_too_long_to_ever_fit_is_refused_before_it_is_tokenised(served, monkeypatch):
    app_encoder = _encoder(served)
    calls = []
    monkeypatch.setattr(app_encoder.tokenizer, "encode", lambda *a, **k: calls.append(a))
    text = "a" * (app_encoder.max_chars + 1)
    for path, body in (("/v1/completions", {"prompt": ["hi", text]}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": text}]})):
        _assert_error(_post(served, path, json=body), 400, "characters")
    assert not calls


def test_prompts_are_tokenised_off_the_event_loop(served, monkeypatch):
    encoder = _encoder(served)
    real = encoder.tokenizer.encode
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder.tokenizer, "encode", recording)
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        assert _post(served, path, json={**body, "max_tokens": 1}).status_code == 200
    assert len(threads) == 2 and all(t.startswith("tokenize") for t in threads), threads


def _encoder(served):
    return served.app.state.encoder
