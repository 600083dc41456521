"""Incremental detokenisation and stop handling on the real SmolLM2 tokenizer."""
import pytest

from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.engine.postprocess import StopChecker
from distserve.request import FinishReason, Request, SamplingParams
from helpers.tiny_models import smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.mark.parametrize("text", [
    "Hello world, this is a plain sentence.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🎉🚀 and ∑ symbols.",
    "  leading spaces\nnew lines\ttabs   ",
])
def test_deltas_add_up_to_the_full_decode(tok, text):
    prompt = tok.encode("Say:")
    out = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.add(t) for t in out]
    assert "".join(deltas) == tok.decode(out, skip_special_tokens=True)
    assert not any("\ufffd" in x for x in deltas)


def test_multibyte_character_is_held_back_until_complete(tok):
    out = tok.encode("🎉", add_special_tokens=False)
    assert len(out) > 1, "the emoji should span several byte-level tokens"
    d = IncrementalDetokenizer(tok, tok.encode("x"))
    deltas = [d.add(t) for t in out]
    assert deltas[:-1] == [""] * (len(out) - 1) and deltas[-1] == "🎉"


def _feed(tok, text, params):
    req = Request("r", tok.encode("Q:"), params)
    d = IncrementalDetokenizer(tok, req.prompt_token_ids)
    stop = StopChecker({tok.eos_token_id}, 10_000)
    deltas = []
    for t in tok.encode(text, add_special_tokens=False):
        req.append_token(t, None, 0.0)
        d.add(t)
        deltas.append(stop.check(req, d))
        if req.is_finished:
            break
    return req, "".join(deltas), deltas


def test_stop_string_trims_output(tok):
    req, emitted, _ = _feed(tok, "one two three. four five", SamplingParams(stop=["."], max_tokens=50))
    assert emitted == "one two three"
    assert req.finish_reason == FinishReason.STOP and req.stop_reason == "."


def test_stop_string_can_be_kept_and_max_tokens_ends(tok):
    _, emitted, _ = _feed(tok, "one two three. four", SamplingParams(
        stop=["three"], include_stop_str_in_output=True, max_tokens=50))
    assert emitted == "one two three"
    req, _, _ = _feed(tok, "a b c d e f g", SamplingParams(max_tokens=3))
    assert req.finish_reason == FinishReason.LENGTH and len(req.output_token_ids) == 3


def test_a_stop_string_over_several_tokens_is_never_streamed_in_part(tok):
    """"\nUser:" arrives as several tokens: the newline before it must not reach the client
    (the text a stop string could begin with is held back until it is ruled out)."""
    text = "Hello there.\nUser: and more"
    assert len(tok.encode("\nUser:", add_special_tokens=False)) > 1
    req, emitted, deltas = _feed(tok, text, SamplingParams(stop=["\nUser:"], max_tokens=50))
    assert emitted == "Hello there." and req.stop_reason == "\nUser:"
    # held back, then let go once ruled out: nothing lost when the request ends otherwise
    _, emitted, deltas = _feed(tok, "a\nUse b c", SamplingParams(stop=["\nUser:"], max_tokens=5))
    assert emitted == tok.decode(tok.encode("a\nUse b c", add_special_tokens=False)[:5])
    assert "\nUse" in emitted and not deltas[-2].endswith("\nUse")
