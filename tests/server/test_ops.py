"""/health, /v1/models, /metrics, and `distserve serve` as a real process."""
from __future__ import annotations


import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.serve_process import free_port, start_serve


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _value(samples, name: str, **labels) -> float:
    want = {"model_name": "tiny", **labels}
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == x for k, x in want.items()))


def test_health_and_models(served):
    r = httpx.get(f"{served.url}/health")
    assert r.status_code == 200
    models = httpx.get(f"{served.url}/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["owned_by"] == "distserve"
    assert card["max_model_len"] == served.client.max_model_len and card["created"] > 0
    assert card["root"] == "tiny"   # no model folder given to build_app: the served name


def test_models_root_is_the_model_folder(served, tiny_llama):
    """`vllm bench serve` without --model loads its tokenizer from /v1/models data[0].root, which
    vLLM fills with the model's path: a bare served name sent it to the Hugging Face hub."""
    import asyncio

    from distserve.server.app import build_app

    async def card():
        app = build_app(served.client, "tiny", model_root=str(tiny_llama))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/v1/models")).json()["data"][0]

    got = asyncio.run(card())
    assert got["id"] == "tiny" and got["root"] == str(tiny_llama)


def test_metrics_move(served):
    before = _samples(served.url)
    r = httpx.post(f"{served.url}/v1/completions", timeout=30,
                   json={"prompt": "count me", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    after = _samples(served.url)

    def moved(name: str, **labels) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("distserve:generation_tokens_total") == 4
    assert moved("distserve:prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert moved("distserve:request_success_total", finished_reason="length") == 1
    assert moved("distserve:time_to_first_token_seconds_count") == 1
    assert moved("distserve:e2e_request_latency_seconds_count") == 1
    assert moved("distserve:inter_token_latency_seconds_count") == 3
    assert moved("distserve:time_per_output_token_seconds_count") == 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert (f"distserve:{gauge}", (("model_name", "tiny"),)) in after
    assert _value(after, "distserve:kv_cache_total_blocks") == served.allocator.num_blocks


@pytest.mark.slow
def test_serve_command(tiny_llama):
    port = free_port()
    proc = start_serve([str(tiny_llama), "--served-model-name", "cli-tiny", "--dtype", "float32",
                        "--num-kv-blocks", "16", "--num-threads", "1"], port)
    url = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"model": "cli-tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "cli-tiny"
        (card,) = httpx.get(f"{url}/v1/models").json()["data"]
        assert card["id"] == "cli-tiny" and card["root"] == str(tiny_llama.resolve())
    finally:
        proc.terminate()
        proc.wait(15)


def test_serve_refuses_a_port_in_use_before_loading_anything(tmp_path):
    """The port is checked first: a model path that does not exist is never reached."""
    import socket
    import subprocess
    import sys

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "distserve.cli", "serve", str(tmp_path / "no-model"),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"--port {port} on 127.0.0.1 cannot be used" in done.stderr
    assert "loading" not in done.stdout


def test_every_command_documents_each_option_and_its_default(monkeypatch):
    """--help lists each option with a line of help and, where it has one, its default; an API
    key taken from the environment is never printed."""
    import argparse

    from distserve.cli import build_parser
    monkeypatch.setenv("DISTSERVE_API_KEY", "not-for-help-text")
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"distserve {name} {action.option_strings[0]} has no help"
        text = command.format_help()
        assert "not-for-help-text" not in text
    serve = commands.choices["serve"].format_help()
    assert "HTTP port (default: 8000)" in serve and "(default: 16)" in serve


def test_serve_help_groups_every_option_by_topic():
    """Every serve flag sits under a named topic of --help, none under argparse's catch-all."""
    import argparse

    from distserve.cli import build_parser
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    catch_all = {"options", "optional arguments", "positional arguments"}
    topic = {id(a): g.title for g in serve._action_groups for a in g._group_actions}
    for action in serve._actions:
        if action.dest != "help":
            assert topic[id(action)] not in catch_all, f"{action.dest} is in {topic[id(action)]!r}"
    text = serve.format_help()
    titles = ["model and dtype:", "HTTP server and security:", "deployment (instance processes):",
              "KV transfer (disaggregated):", "SLOs, metrics and drift:", "several machines (Ray):"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    assert text.index("\n  --port") > text.index("HTTP server and security:") > text.index("\n  --dtype")
