"""The scheduler's role policies on their own: real requests and a real block allocator, no
model. Each test checks who is admitted, in which order, and that blocks balance."""
from __future__ import annotations

import pytest

from distserve.config import EngineConfig
from distserve.engine.scheduler import Scheduler
from distserve.kv.cache_manager import KVCacheManager
from distserve.request import Request, RequestStatus, SamplingParams

BLOCK = 4


def _scheduler(role: str, num_blocks: int = 16, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK)
    return Scheduler(EngineConfig(block_size=BLOCK, **config), kv, role)


def _request(rid: str, prompt_len: int, migrated: bool = False) -> Request:
    req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8))
    if migrated:  # first token already out on a prefill instance
        req.append_token(7, None, 0.0)
        req.status = RequestStatus.WAITING_FOR_KV
    return req


def test_prefill_admits_prompts_fcfs_within_the_budget_and_never_decodes():
    s = _scheduler("prefill", max_num_batched_tokens=10)
    reqs = [_request(f"r{i}", n) for i, n in enumerate((4, 5, 3))]
    for r in reqs:
        s.add(r)
    batch = s.schedule()
    assert [(r.request_id, n) for r, n in batch.prefills] == [("r0", 4), ("r1", 5)]
    assert not batch.decodes and not batch.pulls
    for r, n in batch.prefills:  # the engine ran them; their KV is held for decode
        r.num_computed_tokens += n
        r.append_token(9, None, 0.0)
        s.hand_over(r)
    assert s.schedule().prefills == [(reqs[2], 3)]  # held requests never decode here
    assert s.schedule().is_empty


def test_a_prompt_longer_than_the_budget_runs_alone():
    s = _scheduler("prefill", max_num_batched_tokens=4)
    s.add(_request("long", 9))
    s.add(_request("short", 2))
    assert [r.request_id for r, _ in s.schedule().prefills] == ["long"]


def test_prefill_stops_admitting_when_its_kv_memory_is_full():
    s = _scheduler("prefill", num_blocks=3)
    s.add(_request("a", 8))   # 2 blocks
    s.add(_request("b", 8))   # 2 more: do not fit
    assert [r.request_id for r, _ in s.schedule().prefills] == ["a"]
    assert s.num_waiting == 1 and s.num_waiting_tokens == 8


def test_decode_admits_migrations_when_blocks_are_free_then_decodes_them():
    s = _scheduler("decode", num_blocks=5)
    a, b = _request("a", 8, migrated=True), _request("b", 8, migrated=True)
    s.add(a)
    s.add(b)
    assert s.num_waiting == 2 and s.has_work
    batch = s.schedule()
    # a needs 2 blocks for its prompt and room for 2 more tokens; b then needs 3 + 1 slack
    assert batch.pulls == [a] and batch.decodes == [a]
    assert a.num_computed_tokens == 8 and a.status == RequestStatus.RUNNING
    assert list(s.waiting_for_kv) == [b]
    s.finish(a)
    assert s.schedule().pulls == [b]
    s.finish(b)
    assert s.kv.allocator.num_free == 5


def test_a_migration_aborted_while_waiting_for_kv_frees_nothing_it_does_not_hold():
    s = _scheduler("decode", num_blocks=4)
    s.add(_request("a", 8, migrated=True))
    assert s.abort("a").request_id == "a"
    assert not s.has_work and s.kv.allocator.num_free == 4


def test_colocated_prefill_first_runs_prompts_before_decodes():
    s = _scheduler("colocated")
    first = _request("first", 4)
    s.add(first)
    batch = s.schedule()
    assert batch.prefills == [(first, 4)]
    first.num_computed_tokens = 4
    first.append_token(5, None, 0.0)
    s.add(_request("second", 4))
    assert [r.request_id for r, _ in s.schedule().prefills] == ["second"]


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_every_role_takes_a_known_name_only(role):
    assert _scheduler(role).role == role
    with pytest.raises(ValueError, match="unknown instance role"):
        _scheduler("router")
