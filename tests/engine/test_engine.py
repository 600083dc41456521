"""The one engine contract, in one process: a prefill engine hands a request over to a decode
engine (KV copied between their real caches), and the pair gives the colocated engine's
tokens; any executor can run the batches; every block comes back."""
from __future__ import annotations

import pytest

from distserve.config import EngineConfig
from distserve.engine.engine import Engine, Migration
from distserve.engine.executor import LocalExecutor
from distserve.request import SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is a city of bridges and", "x"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _config(model, blocks=32):
    return EngineConfig(model=str(model), dtype="float32", num_kv_blocks=blocks, num_threads=1)


def _run(engine):
    tokens = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _hand_over(prefill, decode, check_ticket=lambda ticket: None) -> dict:
    """Runs a prefill engine and a decode engine as the controller does, until both are done:
    each ticket goes to the decode engine, each pulled request is released on the prefill
    side. The tokens the client sees, and the decode side's pulls, failures and recomputes."""
    seen = {"tokens": [], "pulled": [], "failed": [], "recomputed": []}
    while prefill.has_unfinished or decode.has_unfinished:
        step = prefill.step() if prefill.has_unfinished else None
        for ticket in step.kv_ready if step else []:
            check_ticket(ticket)
            seen["tokens"] += step.outputs[0].new_token_ids
            decode.add(ticket.prompt_token_ids, GREEDY, ticket.request_id, ticket.arrival_time,
                       Migration(ticket, "prefill-0"))
        step = decode.step()
        seen["failed"] += step.kv_failed
        seen["recomputed"] += step.kv_recomputed
        seen["pulled"] += step.kv_pulled
        for done in step.kv_pulled:
            prefill.release(done.request_id)
        for out in step.outputs:
            seen["tokens"] += out.new_token_ids
    return seen


@pytest.fixture(scope="module")
def colocated_tokens(tiny_llama):
    engine = Engine(_config(tiny_llama))
    for i, p in enumerate(PROMPTS):
        engine.add(p, GREEDY, f"r{i}")
    return _run(engine)


def test_prefill_hands_over_to_decode_and_the_pair_matches_colocated(tiny_llama, colocated_tokens):
    prefill = Engine(_config(tiny_llama), role="prefill")

    def pull(source, src_blocks, dst_blocks):
        assert source == "prefill-0"
        src, dst = prefill.executor.kv_cache, decode.executor.kv_cache
        dst[dst_blocks] = src[src_blocks]
        return len(src_blocks) * src[0].nbytes, 0.0

    # 3 blocks: the third request waits for room (WAITING_FOR_KV) until one finishes
    decode = Engine(_config(tiny_llama, blocks=3), role="decode", pull=pull)
    for i, p in enumerate(PROMPTS):
        prefill.add(p, GREEDY, f"r{i}")
    tokens, pulled, most_waiting = {}, [], 0
    while prefill.has_unfinished or decode.has_unfinished:
        if prefill.has_unfinished:
            step = prefill.step()
            for out in step.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            for ticket in step.kv_ready:
                decode.add(ticket.prompt_token_ids, GREEDY, ticket.request_id,
                           ticket.arrival_time, Migration(ticket, "prefill-0"))
        step = decode.step()
        most_waiting = max(most_waiting, decode.stats().num_waiting)  # no room after a step
        for done in step.kv_pulled:
            prefill.release(done.request_id)
            pulled.append(done.request_id)
        for out in step.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens == colocated_tokens
    assert sorted(pulled) == ["r0", "r1", "r2"] and most_waiting >= 1
    for engine in (prefill, decode):
        s = engine.stats()
        assert s.num_free_blocks == s.num_blocks and not engine.requests
        engine.kv.allocator.check()


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16, ignore_eos=True)


def _outputs(engine, rid):
    """Every output of one request, step by step, until it finishes or the engine idles."""
    outs = []
    while engine.has_unfinished:
        outs += [o for o in engine.step().outputs if o.request_id == rid]
    return outs


def test_a_seeded_request_draws_the_same_tokens_disaggregated(tiny_llama):
    """Each token is drawn from the seed and its position, so the prefill instance drawing
    the first and the decode instance the rest gives the colocated engine's tokens."""
    colocated = Engine(_config(tiny_llama))
    colocated.add(PROMPTS[0], SEEDED, "s")
    expected = [t for o in _outputs(colocated, "s") for t in o.new_token_ids]
    prefill = Engine(_config(tiny_llama), role="prefill")

    def pull(source, src_blocks, dst_blocks):
        decode.executor.kv_cache[dst_blocks] = prefill.executor.kv_cache[src_blocks]
        return 0, 0.0

    decode = Engine(_config(tiny_llama), role="decode", pull=pull)
    prefill.add(PROMPTS[0], SEEDED, "s")
    step = prefill.step()
    ticket = step.kv_ready[0]
    decode.add(ticket.prompt_token_ids, SEEDED, "s", ticket.arrival_time, Migration(ticket, "p"))
    tokens = step.outputs[0].new_token_ids + [t for o in _outputs(decode, "s")
                                              for t in o.new_token_ids]
    prefill.release("s")
    assert tokens == expected and len(set(expected)) > 4   # sampled, not a repeated token


def test_a_rerun_continues_exactly_where_the_first_run_stopped(tiny_llama):
    """A request run again from its prompt plus the tokens already streamed (its instance
    died), told so (Resume): a stop string that straddles the cut is seen, the text held back
    for it is not lost, and a seeded request draws the tokens it would have drawn."""
    import dataclasses

    from distserve.cluster.messages import Resume

    whole = Engine(_config(tiny_llama))
    whole.add(PROMPTS[1], SEEDED, "w")
    texts = [o.new_text for o in _outputs(whole, "w")]
    joined = "".join(texts)
    # a stop string over the boundary of tokens k-1 and k, found nowhere before
    cut = next(k for k in range(4, 14) if texts[k - 1] and texts[k]
               and joined.find(texts[k - 1][-1] + texts[k][0]) == len("".join(texts[:k])) - 1)
    stop = dataclasses.replace(SEEDED, stop=[texts[cut - 1][-1] + texts[cut][0]])

    reference = Engine(_config(tiny_llama))
    reference.add(PROMPTS[1], stop, "r")
    outs = _outputs(reference, "r")
    expected_tokens = [t for o in outs for t in o.new_token_ids]
    expected_text = "".join(o.new_text for o in outs)
    assert outs[-1].finish_reason == "stop" and len(expected_tokens) == cut + 1

    first = Engine(_config(tiny_llama))
    prompt_ids = first.tokenizer.encode(PROMPTS[1])
    first.add(prompt_ids, stop, "i")
    before = []
    while len(before) < cut:                         # its instance dies after `cut` tokens
        before += [o for o in first.step().outputs if o.request_id == "i"]
    tokens = [t for o in before for t in o.new_token_ids]
    text = "".join(o.new_text for o in before)
    assert not before[-1].finished
    assert text == "".join(texts[:cut])[:-1]         # the stop's first character held back

    again = Engine(_config(tiny_llama))
    again.add(prompt_ids + tokens, dataclasses.replace(stop, max_tokens=stop.max_tokens - cut),
              "i", resume=Resume(len(tokens), len(text)))
    after = _outputs(again, "i")
    assert tokens + [t for o in after for t in o.new_token_ids] == expected_tokens
    assert text + "".join(o.new_text for o in after) == expected_text
    assert after[-1].finish_reason == "stop"


def test_a_prefill_engine_holds_kv_until_released_or_aborted(tiny_llama):
    prefill = Engine(_config(tiny_llama), role="prefill")
    for rid in ("kept", "dropped"):
        prefill.add("Once upon a time", GREEDY, rid)
    assert prefill.stats().queued_tokens > 0
    step = prefill.step()
    assert [t.request_id for t in step.kv_ready] == ["kept", "dropped"]
    assert not prefill.has_unfinished and prefill.stats().num_running == 2  # held
    assert prefill.abort("dropped").finish_reason == "abort"
    prefill.release("kept")
    s = prefill.stats()
    assert s.num_free_blocks == s.num_blocks and not prefill.requests


def test_any_executor_runs_the_batches(tiny_llama, colocated_tokens):
    class Recording:
        """A real executor, wrapped: it sees every batch the engine runs."""

        def __init__(self, inner):
            self.inner, self.batches = inner, []
            for name in ("model_name", "tokenizer", "vocab_size", "num_kv_blocks",
                         "max_model_len", "eos_token_ids", "kv_cache"):
                setattr(self, name, getattr(inner, name))

        def execute(self, prefills, decodes):
            self.batches.append((len(prefills), len(decodes)))
            return self.inner.execute(prefills, decodes)

    executor = Recording(LocalExecutor.load(_config(tiny_llama)))
    engine = Engine(_config(tiny_llama), executor)
    for i, p in enumerate(PROMPTS):
        engine.add(p, GREEDY, f"r{i}")
    assert _run(engine) == colocated_tokens
    assert executor.batches[0] == (3, 0) and executor.batches[-1][0] == 0


def test_roles_take_what_they_can_run(tiny_llama):
    executor = LocalExecutor.load(_config(tiny_llama))
    with pytest.raises(ValueError, match="needs a pull function"):
        Engine(_config(tiny_llama), executor, role="decode")
    with pytest.raises(ValueError, match="unknown instance role"):
        Engine(_config(tiny_llama), executor, role="router")
    colocated = Engine(_config(tiny_llama), executor)
    with pytest.raises(ValueError, match="takes no migrations"):
        colocated.add([1, 2], GREEDY, "m", migration=object())


@pytest.mark.parametrize("policy", ["recompute", "rerun"])
def test_kv_checksum_passes_good_copies_and_stops_a_corrupted_one(tiny_llama, colocated_tokens,
                                                                   policy):
    """--kv-checksum: the pair still gives the colocated tokens; a copy with one byte flipped
    (injected: a bad copy cannot be caused for real on one machine) is tried again, then never
    decoded from: the decode engine computes the prompt itself and still gives the colocated
    tokens (--kv-pull-failure recompute), or drops the request alone, its blocks freed, to run
    again elsewhere (rerun)."""
    import dataclasses

    from distserve.transfer.base import byte_rows

    config = dataclasses.replace(_config(tiny_llama), kv_checksum=True, kv_pull_failure=policy)
    prefill = Engine(config, role="prefill")
    calls = []

    def pull(source, src_blocks, dst_blocks):
        src, dst = prefill.executor.kv_cache, decode.executor.kv_cache
        dst[dst_blocks] = src[src_blocks]
        calls.append(list(dst_blocks))
        if corrupt:
            byte_rows(dst)[dst_blocks[0], 7] ^= 0x10
        return len(src_blocks) * src[0].nbytes, 0.0

    decode = Engine(config, role="decode", pull=pull)
    for corrupt in (False, True):
        prefill.add(PROMPTS[1], GREEDY, f"c{corrupt}")
        def check_ticket(ticket):
            assert ticket.block_checksums and len(ticket.block_checksums) == len(ticket.block_ids)
        seen = _hand_over(prefill, decode, check_ticket)
        tokens, failed, recomputed = seen["tokens"], seen["failed"], seen["recomputed"]
        if not corrupt:
            assert tokens == colocated_tokens["r1"] and not failed and not recomputed
            continue
        assert calls[-1] == calls[-2]                     # tried twice
        prefill.release("cTrue")                          # what the controller does next
        if policy == "recompute":
            assert not failed and [rid for rid, _ in recomputed] == ["cTrue"]
            assert "checksum" in recomputed[0][1]
            assert tokens == colocated_tokens["r1"]      # computed here, never from bad KV
        else:
            assert not recomputed and [rid for rid, _ in failed] == ["cTrue"]
            assert "checksum" in failed[0][1]
    for engine in (prefill, decode):
        s = engine.stats()
        assert s.num_free_blocks == s.num_blocks and not engine.requests


def test_a_request_whose_sampling_fails_ends_alone(tiny_llama, colocated_tokens, monkeypatch):
    """Its stream raises RequestFailed (the server's 500 for that request); the requests
    beside it in the same batches finish with their tokens; every block comes back."""
    import asyncio

    from distserve.engine import sampler
    from distserve.engine.async_engine import AsyncEngine, RequestFailed
    real = sampler._filtered_probs

    def flaky(logits, params):   # injected: every setting that could break it is refused
        if any(p.top_k == 7 for p in params):
            raise RuntimeError("injected")
        return real(logits, params)
    monkeypatch.setattr(sampler, "_filtered_probs", flaky)
    engine = Engine(_config(tiny_llama))
    bad = SamplingParams(temperature=1.0, top_k=7, max_tokens=12)

    async def run():
        ae = AsyncEngine(engine)
        try:
            streams = [await ae.generate(p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)]
            streams.append(await ae.generate(PROMPTS[0], bad, "bad"))

            async def tokens(stream):
                return [t async for out in stream for t in out.new_token_ids]
            results = await asyncio.gather(*map(tokens, streams), return_exceptions=True)
            return results, ae.stats()
        finally:
            ae.shutdown()
    results, stats = asyncio.run(run())
    assert isinstance(results[-1], RequestFailed) and "injected" in str(results[-1])
    assert {f"r{i}": t for i, t in enumerate(results[:-1])} == colocated_tokens
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("prompt_len", [15, 16, 32, 33])
def test_a_prompt_of_whole_blocks_is_pulled_not_recomputed(tiny_llama, prompt_len):
    """Over a real shm transfer (its puller checks the block counts): a prompt that fills its
    last block exactly gets one more block on the decode side for the next token's slot, before
    the pull. Only the prompt's blocks are pulled: none is computed again, and the tokens are
    the colocated engine's. (Every such prompt used to fail its pull and be recomputed.)"""
    from distserve.engine.executor import LocalExecutor
    from distserve.transfer import ShmPuller, make_source

    sources = []

    def allocate(shape, num_blocks, dtype, device):
        cache, source = make_source("shm", shape, num_blocks, dtype, device, secret=b"s" * 32)
        sources.append(source)
        return cache

    config = _config(tiny_llama)
    prefill = Engine(config, LocalExecutor.load(config, allocate), role="prefill")
    puller = ShmPuller()

    def pull(source, src_blocks, dst_blocks):
        stats = puller.pull(sources[0].endpoint, src_blocks, decode.executor.kv_cache, dst_blocks)
        return stats.nbytes, stats.seconds

    decode = Engine(config, role="decode", pull=pull)
    prompt = [5 + i % 90 for i in range(prompt_len)]
    try:
        prefill.add(prompt, GREEDY, "p")
        seen = _hand_over(prefill, decode)
        tokens, recomputed, pulled = seen["tokens"], seen["recomputed"], seen["pulled"]
        assert not recomputed, recomputed
        assert len(pulled) == 1 and pulled[0].nbytes == -(-prompt_len // 16) * sources[0].endpoint.bytes_per_block
        colocated = Engine(config)
        colocated.add(prompt, GREEDY, "c")
        assert tokens == _run(colocated)["c"]
        for engine in (prefill, decode):
            s = engine.stats()
            assert s.num_free_blocks == s.num_blocks and not engine.requests
    finally:
        puller.close()
        for source in sources:
            source.close()
