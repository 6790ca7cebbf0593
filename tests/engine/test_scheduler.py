"""Scheduler and block pool on CPU, without a model: exact block ids and scheduling order."""

from __future__ import annotations

import itertools

import pytest

from convoy.config import SchedulerConfig
from convoy.engine.block_pool import BlockPool, BlockPoolError
from convoy.engine.kv_cache_manager import KVCacheManager
from convoy.engine.request import FinishReason, Request, RequestStatus
from convoy.engine.scheduler import Scheduler, SchedulerOutput
from convoy.sampling_params import SamplingParams

EOS = 2


_prompt_starts = itertools.count(10, 1000)


def make_request(
    rid: str, prompt_len: int, max_tokens: int = 8, prompt: list[int] | None = None
) -> Request:
    """A request whose prompt shares no tokens with any other's (unless ``prompt`` is given)."""
    if prompt is None:
        start = next(_prompt_starts)
        prompt = list(range(start, start + prompt_len))
    return Request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens),
        eos_token_ids=frozenset({EOS}),
        max_tokens=max_tokens,
    )


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    budget: int = 64,
    seqs: int = 8,
    prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget),
        KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching),
    )


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request id, start, num_tokens) of each scheduled request, in order."""
    return [(s.request.request_id, s.start, s.num_tokens) for s in out.scheduled]


def sample_all(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    sched.update_from_output(
        out, {s.request.request_id: [token] for s in out.scheduled if s.samples}
    )
    sched.check_integrity()


# -- block pool ------------------------------------------------------------------------------
def test_pool_reuses_recently_freed_ids_first_and_checks_integrity() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.free([1, 0])
    # Memory already written (0 freed last, then 1) before the never-used 3.
    assert pool.allocate(3) == [0, 1, 3]
    pool.check_integrity()
    assert pool.num_free_blocks == 0
    with pytest.raises(BlockPoolError):
        pool.allocate(1)


def test_pool_rejects_double_free_and_catches_corruption() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(BlockPoolError, match="not in use"):
        pool.free([blocks[0]])
    pool.ref_counts[2] = 1  # corrupt: in use but still in the free queue
    with pytest.raises(BlockPoolError):
        pool.check_integrity()


def test_kv_manager_grows_tables_and_frees_in_reverse() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a, b = make_request("a", 5), make_request("b", 3)
    assert kv.allocate_slots(a, 5)
    assert kv.get_block_table("a") == [0, 1]
    assert kv.allocate_slots(b, 3)
    assert kv.get_block_table("b") == [2]
    a.num_computed_tokens = 5
    assert kv.allocate_slots(a, 3)  # 8 tokens still fit in 2 blocks
    assert kv.get_block_table("a") == [0, 1]
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 1)
    assert kv.get_block_table("a") == [0, 1, 3]
    assert not kv.allocate_slots(b, 16)  # would need 3 more, only 2 free: nothing taken
    assert kv.get_block_table("b") == [2]
    kv.free(a)
    # Freed tail first: 3, 1 (unnamed) go on top of the never-used 4, 5, most recent first;
    # 0 holds a's named prompt block and is handed out (evicted) last.
    assert kv.pool.allocate(5) == [1, 3, 4, 5, 0]
    kv.pool.free([4, 5, 3, 1, 0])
    kv.check_integrity(live_request_ids={"b"})
    with pytest.raises(BlockPoolError, match="still holds"):
        kv.check_integrity(live_request_ids=set())


# -- scheduler -------------------------------------------------------------------------------
def test_decodes_first_then_prompt_chunks_fill_the_budget() -> None:
    sched = make_scheduler(num_blocks=32, budget=10)
    sched.add_request(make_request("a", 6))
    out = sched.schedule()
    assert plan(out) == [("a", 0, 6)]
    sample_all(sched, out)

    sched.add_request(make_request("b", 20))
    sched.add_request(make_request("c", 4))
    out = sched.schedule()
    # a decodes (1 token), b takes the remaining 9 of the budget; c waits.
    assert plan(out) == [("a", 6, 1), ("b", 0, 9)]
    assert [s.samples for s in out.scheduled] == [True, False]
    sample_all(sched, out)
    out = sched.schedule()
    assert plan(out) == [("a", 7, 1), ("b", 9, 9)]
    sample_all(sched, out)
    out = sched.schedule()
    assert plan(out) == [("a", 8, 1), ("b", 18, 2), ("c", 0, 4)]
    assert [s.samples for s in out.scheduled] == [True, True, True]
    # a's third block (for its 9th token) was taken this step, after b's five.
    assert [s.block_table for s in out.scheduled] == [[0, 1, 7], [2, 3, 4, 5, 6], [8]]
    sample_all(sched, out)


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(num_blocks=32, budget=100, seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 2))
    out = sched.schedule()
    assert [p[0] for p in plan(out)] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_order_and_recovery(prefix_caching: bool) -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, budget=64, prefix_caching=prefix_caching)
    a, b = make_request("a", 4, 20), make_request("b", 4, 20)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert plan(out) == [("a", 0, 4), ("b", 0, 4)]
    sample_all(sched, out)  # both have 5 tokens now; position 4 needs a new block each
    out = sched.schedule()
    # a gets block 2; b finds the pool empty and, being the newest, is preempted.
    assert plan(out) == [("a", 4, 1)]
    assert out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.kv_cache.get_block_table("a") == [0, 2]
    assert list(sched.waiting) == [b]
    assert sched.num_preemptions == 1
    sample_all(sched, out)
    # While a runs alone, b waits (needs 2 blocks for its 5 tokens, 1 free).
    out = sched.schedule()
    assert plan(out) == [("a", 5, 1)]
    sample_all(sched, out)
    sched.finish_requests(["a"], FinishReason.ABORT)
    assert a.finish_reason is FinishReason.ABORT
    out = sched.schedule()
    # Freed: 1 (b's), then 2, 0 (a's, tail first). With prefix caching b finds its full
    # prompt block 1 still cached and computes only its output token, in a's partial block 2
    # (0 holds a's named prompt block, kept while anything else is free); without, it
    # recomputes prompt + output token in the most recently freed blocks, 0 and 2.
    if prefix_caching:
        assert plan(out) == [("b", 4, 1)]
        assert b.num_cached_tokens == 0  # what it found when *first* scheduled
        assert sched.kv_cache.get_block_table("b") == [1, 2]
    else:
        assert plan(out) == [("b", 0, 5)]
        assert sched.kv_cache.get_block_table("b") == [0, 2]
    assert out.finished_request_ids == ["a"]
    sample_all(sched, out)


def test_a_request_preempts_itself_when_it_is_the_newest() -> None:
    sched = make_scheduler(num_blocks=2, block_size=2, budget=64)
    a, b = make_request("a", 2, 20), make_request("b", 2, 20)
    sched.add_request(a)
    sched.add_request(b)
    sample_all(sched, sched.schedule())
    out = sched.schedule()
    # a needs a block: b (newest) is preempted, freeing block 1 for a.
    assert plan(out) == [("a", 2, 1)]
    assert out.preempted == [b]
    assert sched.kv_cache.get_block_table("a") == [0, 1]


def test_finish_on_eos_max_tokens_and_abort_return_every_block() -> None:
    sched = make_scheduler(num_blocks=8)
    a, b, c = make_request("a", 3, 2), make_request("b", 3, 5), make_request("c", 3, 5)
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, {"a": [7], "b": [EOS], "c": [7]})
    assert b.finish_reason is FinishReason.STOP and b.stop_reason is None
    out = sched.schedule()
    sched.update_from_output(out, {"a": [7], "c": [7]})
    assert a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [7, 7]
    sched.finish_requests(["c"], FinishReason.ABORT)
    sched.finish_requests(["c", "nope"], FinishReason.ABORT)  # twice, and unknown: no-ops
    assert c.finish_reason is FinishReason.ABORT
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.pool.num_free_blocks == 8
    sched.check_integrity()


def test_min_tokens_and_stop_token_ids() -> None:
    sched = make_scheduler(num_blocks=8)
    r = Request(
        "r",
        [10, 11],
        SamplingParams(min_tokens=2, stop_token_ids=[9], max_tokens=10),
        eos_token_ids=frozenset({EOS}),
        max_tokens=10,
    )
    sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, {"r": [EOS]})  # below min_tokens: not a stop
    assert not r.is_finished
    out = sched.schedule()
    sched.update_from_output(out, {"r": [9]})
    assert r.finish_reason is FinishReason.STOP and r.stop_reason == 9


def test_max_tokens_zero_finishes_after_the_prompt() -> None:
    sched = make_scheduler(num_blocks=8)
    r = make_request("r", 5, max_tokens=0)
    sched.add_request(r)
    out = sched.schedule()
    updated = sched.update_from_output(out, {"r": [7]})
    assert updated == [(r, [])]
    assert r.finish_reason is FinishReason.LENGTH and r.output_token_ids == []
