"""The streaming client and the run loop against a loopback stand-in server (timings checked
loosely: the machine is shared) and against servers that misbehave on purpose."""

import asyncio
import socket

from distserve.bench.client import build_payload, send_request, server_info
from distserve.bench.runner import RunConfig, make_client, run_requests
from distserve.bench.workload import BenchRequest

from .conftest import FIRST_DELAY, GAP


def send(base_url, max_tokens=5, chat=False, **kw):
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"

    async def go():
        async with make_client(10) as client:
            return await send_request(client, base_url + endpoint,
                                      build_payload("fake-model", "hi", max_tokens, chat=chat, ignore_eos=True),
                                      input_len=3, timeout=kw.pop("timeout", 10), chat=chat, **kw)
    return asyncio.run(go())


def test_streamed_timings(serve_fake):
    server, url = serve_fake("ok")
    r = send(url, max_tokens=6)
    assert r.success and r.error == ""
    assert r.output_len == 6 and len(r.itl) == 5
    assert FIRST_DELAY * 0.9 <= r.ttft < FIRST_DELAY + 1.0
    # a client delayed once (another process, a garbage collection) reads two chunks at once
    # and sees one gap of ~0: the gaps are checked as a whole
    assert sorted(r.itl)[len(r.itl) // 2] >= GAP * 0.5 and sum(r.itl) >= len(r.itl) * GAP * 0.5
    assert r.ttft <= r.last_token_time <= r.e2el
    body = server.bodies[0]
    assert body["stream"] and body["max_tokens"] == 6 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_chat_endpoint_skips_the_role_only_chunk(serve_fake):
    server, url = serve_fake("ok")
    r = send(url, max_tokens=4, chat=True)
    assert r.success and r.output_len == 4 and len(r.itl) == 3
    assert server.bodies[0]["messages"] == [{"role": "user", "content": "hi"}]


def test_http_error_is_a_failure_with_the_server_message(serve_fake):
    _, url = serve_fake("error500")
    r = send(url)
    assert not r.success and r.error == "HTTP 500: engine exploded"


def test_malformed_sse(serve_fake):
    _, url = serve_fake("malformed")
    r = send(url)
    assert not r.success and "malformed SSE chunk" in r.error


def test_not_an_event_stream(serve_fake):
    _, url = serve_fake("not_sse")
    r = send(url)
    assert not r.success and "malformed SSE line" in r.error


def test_stream_cut_before_done(serve_fake):
    _, url = serve_fake("truncated")
    r = send(url)
    assert not r.success and "without [DONE]" in r.error


def test_timeout(serve_fake):
    _, url = serve_fake("ok")
    r = send(url, max_tokens=50, timeout=0.1)
    assert not r.success and r.error == "timed out after 0.1 s"


def test_unreachable_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = send(f"http://127.0.0.1:{port}")
    assert not r.success and "Connect" in r.error


def test_server_info_reads_models_and_gpus(serve_fake):
    _, url = serve_fake("ok", num_gpus=3)

    async def go():
        async with make_client(5) as client:
            return await server_info(client, url)
    info = asyncio.run(go())
    assert info["models"] == ["fake-model"] and info["num_gpus"] == 3


def test_run_accounts_for_every_request(serve_fake):
    server, url = serve_fake("flaky")
    requests = [BenchRequest("p", 3, 4) for _ in range(8)]
    records = []
    cfg = RunConfig(url, "fake-model", request_rate=200.0, max_concurrency=3, seed=0, progress=False)
    duration = asyncio.run(run_requests(cfg, requests, records))
    assert len(records) == 8 and len(server.bodies) == 8
    assert sum(r.success for r in records) == 4
    assert all(r.error.startswith("HTTP 500") for r in records if not r.success)
    assert duration >= max(r.send_time + r.e2el for r in records if r.success) - 1e-6
    # never more than --max-concurrency in flight
    events = sorted([(r.send_time, 1) for r in records] + [(r.send_time + r.e2el, -1) for r in records])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak <= 3
