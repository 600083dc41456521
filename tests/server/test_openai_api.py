"""The server as the official `openai` client sees it: bodies, streams, usage, determinism."""
from __future__ import annotations

import httpx

MODEL = "tiny"  # the name tests/server/conftest.py serves the model under
PROMPT = "The capital of France is"


def test_completion_body_and_usage(oai, served):
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    prompt_tokens = len(served.client.tokenizer.encode(PROMPT))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == prompt_tokens + 7


def test_greedy_is_deterministic_and_stream_matches(oai):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    a = oai.completions.create(**args).choices[0].text
    b = oai.completions.create(**args).choices[0].text
    assert a == b
    chunks = list(oai.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == a
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_include_usage(oai):
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert all(c.usage is None for c in body)


def test_chat_completion_and_stream(oai):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say hello."}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=9,
                                    temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.completion_tokens <= 9
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == item.top_logprobs[0].logprob  # greedy picks the top one


def test_completion_n_list_prompts_logprobs_and_echo(oai):
    r = oai.completions.create(model=MODEL, prompt=["one", "two three"], n=2, max_tokens=4,
                               temperature=0.8, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    r = oai.completions.create(model=MODEL, prompt=[[17, 18, 19]], max_tokens=3,
                               temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True)
    assert r.choices[0].text.startswith(PROMPT)


def test_seeded_sampling_repeats(oai):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 123}
    assert oai.completions.create(**args).choices[0].text == \
        oai.completions.create(**args).choices[0].text


def test_request_id_is_prefix_and_echoed(served):
    r = httpx.post(f"{served.url}/v1/completions", headers={"X-Request-Id": "trace-42"},
                   json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == "cmpl-trace-42"
    assert httpx.get(f"{served.url}/health").headers["x-request-id"]  # generated when absent
