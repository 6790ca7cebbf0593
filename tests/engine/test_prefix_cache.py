"""Prefix caching without a model: hashes, sharing, ref counts, LRU eviction, exact block ids."""

from __future__ import annotations

import pytest

from convoy.config import SchedulerConfig
from convoy.engine.block_pool import BlockPool, BlockPoolError
from convoy.engine.kv_cache_manager import KVCacheManager
from convoy.engine.prefix_cache import extend_block_hashes, hash_block, namespace_root
from convoy.engine.request import Request
from convoy.engine.scheduler import Scheduler
from convoy.sampling_params import SamplingParams
from tests.engine.test_scheduler import plan, sample_all

ROOT = namespace_root()


def req(rid: str, prompt: list[int], root: bytes = ROOT, prompt_logprobs: bool = False) -> Request:
    params = SamplingParams(max_tokens=8, prompt_logprobs=0 if prompt_logprobs else None)
    return Request(
        rid,
        prompt,
        params,
        eos_token_ids=frozenset({2}),
        max_tokens=8,
        cache_root=root,
        lookup_prefix_cache=not prompt_logprobs,
    )


def admit(kv: KVCacheManager, r: Request) -> list[int]:
    """What the scheduler does on admission: reuse the cached prefix, allocate the rest."""
    cached = kv.find_cached_prefix(r)
    assert kv.allocate_slots(r, r.num_tokens - len(cached) * kv.block_size, cached)
    r.num_computed_tokens = r.num_tokens
    return kv.get_block_table(r.request_id)


# -- hashes ----------------------------------------------------------------------------------
def test_block_names_chain_over_everything_before_them() -> None:
    a = extend_block_hashes([], ROOT, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # only full blocks are named
    assert a[0] == hash_block(ROOT, [1, 2, 3, 4])
    assert a[1] == hash_block(a[0], [5, 6, 7, 8])
    # The same second block after a different first block has another name.
    b = extend_block_hashes([], ROOT, [0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[0] != a[0] and b[1] != a[1]
    # Extending only appends what is missing.
    assert extend_block_hashes(a[:1], ROOT, list(range(1, 13)), 4)[:2] == a
    # Salts (and None vs "") give different roots; parts are length-prefixed.
    roots = {
        namespace_root(),
        namespace_root(None),
        namespace_root(""),
        namespace_root("tenant-a"),
        namespace_root("tenant-b"),
        namespace_root("ab", "c"),
        namespace_root("a", "bc"),
    }
    assert len(roots) == 7
    assert namespace_root("tenant-a") == namespace_root("tenant-a")


# -- pool ------------------------------------------------------------------------------------
def test_pool_keeps_freed_cached_blocks_and_evicts_least_recently_freed() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    for b, h in zip(blocks, [b"h0", b"h1", b"h2"], strict=True):
        pool.cache(b, h)
    pool.free([2, 0, 1])  # free queue: 3 (never used), 2, 0, 1
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 3
    assert pool.lookup(b"h1") == 1
    # A hit takes a block out of the middle of the free queue.
    pool.touch([0])
    assert pool.ref_counts[0] == 1 and pool.num_free_blocks == 3
    # Allocation takes the never-used block, then evicts 2 (freed first), then 1.
    assert pool.allocate(2) == [3, 2]
    assert pool.lookup(b"h2") is None and pool.num_evictions == 1
    assert pool.lookup(b"h0") == 0  # held: never evicted
    assert pool.allocate(1) == [1]
    assert pool.num_evictions == 2
    with pytest.raises(BlockPoolError):
        pool.allocate(1)
    pool.check_integrity()


def test_pool_sharing_counts_references() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache(b, b"h")
    pool.touch([b])
    pool.touch([b])
    assert pool.ref_counts[b] == 3
    pool.free([b])
    pool.free([b])
    assert pool.num_free_blocks == 1  # still held once
    pool.free([b])
    assert pool.num_free_blocks == 2 and pool.lookup(b"h") == b
    with pytest.raises(BlockPoolError, match="not in use"):
        pool.free([b])


def test_pool_first_block_to_hold_a_name_keeps_it() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"h")
    pool.cache(b, b"h")  # computed the same tokens at the same time: stays private
    assert pool.lookup(b"h") == a and pool.block_hash[b] is None
    with pytest.raises(BlockPoolError, match="another hash"):
        pool.cache(a, b"other")
    pool.free([a, b])
    with pytest.raises(BlockPoolError, match="not in use"):
        pool.cache(a, b"x")
    pool.check_integrity()


def test_integrity_check_covers_cached_blocks() -> None:
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.cache(b, b"h")
    pool.check_integrity()
    pool.cached[b"ghost"] = 2  # a name pointing at a block that does not carry it
    with pytest.raises(BlockPoolError, match="does not carry its hash"):
        pool.check_integrity()
    del pool.cached[b"ghost"]
    pool.block_hash[2] = b"stray"  # a block carrying a name the cache does not know
    with pytest.raises(BlockPoolError, match="does not know"):
        pool.check_integrity()
    pool.block_hash[2] = None
    pool.reset_cache()
    assert pool.num_cached_blocks == 0 and pool.block_hash == [None] * 3
    pool.check_integrity()


# -- KV cache manager ------------------------------------------------------------------------
def test_requests_share_full_prompt_blocks_and_keep_them_after_finishing() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(100, 110)))  # blocks: [100..103] [104..107] [108 109]
    assert admit(kv, a) == [0, 1, 2]
    assert kv.pool.num_cached_blocks == 2  # the partial block 2 has no name
    # b shares the first 6 tokens: block 0 in full, block 1 diverges in the middle.
    b = req("b", [*range(100, 106), 7, 7, 7])
    assert kv.find_cached_prefix(b) == [0]
    assert admit(kv, b) == [0, 3, 4]
    assert kv.pool.ref_counts.tolist()[:5] == [2, 1, 1, 1, 1]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (19, 4)
    kv.free(a)
    kv.free(b)
    kv.check_integrity(live_request_ids=set())
    assert kv.pool.num_free_blocks == 8
    # c repeats a's prompt after both finished: a's full blocks are still there.
    c = req("c", list(range(100, 110)))
    assert kv.find_cached_prefix(c) == [0, 1]
    assert admit(kv, c)[:2] == [0, 1]
    kv.check_integrity(live_request_ids={"c"})


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, req("a", list(range(100, 108))))  # two full blocks, both named
    assert kv.pool.num_cached_blocks == 2
    # Same 8 tokens: the logits of the last one are needed, so only block 0 is reused.
    b = req("b", list(range(100, 108)))
    assert kv.find_cached_prefix(b) == [0]
    # One token more: both blocks are reused and only token 8 is computed.
    c = req("c", list(range(100, 109)))
    assert kv.find_cached_prefix(c) == [0, 1]
    assert admit(kv, c) == [0, 1, 2]


def test_namespaces_and_prompt_logprobs_do_not_reuse() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, req("a", list(range(100, 110))))
    salted = req("s", list(range(100, 110)), root=namespace_root("tenant"))
    assert kv.find_cached_prefix(salted) == []
    # Prompt logprobs need every prompt position computed; the blocks are still named.
    scored = req("p", list(range(100, 110)), prompt_logprobs=True)
    assert kv.find_cached_prefix(scored) == []


def test_hits_on_free_blocks_count_against_free_space() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = req("a", list(range(100, 109)))
    admit(kv, a)
    kv.free(a)  # blocks 0, 1 cached and free; 2 free
    b = req("b", [*range(100, 108), 5, 6, 7, 8, 9])  # reuses 0, 1; needs 2 more blocks
    cached = kv.find_cached_prefix(b)
    assert cached == [0, 1]
    # 3 free blocks, but 2 of them are the hits themselves: only 1 is left for new tokens.
    assert not kv.allocate_slots(b, 5, cached)
    assert kv.pool.ref_counts.tolist() == [0, 0, 0]  # nothing taken
    assert kv.allocate_slots(b, 1, cached)
    assert kv.get_block_table("b") == [0, 1, 2]


def test_eviction_order_when_the_pool_needs_room() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [10, 11, 12, 13, 14])
    admit(kv, a)  # blocks 0, 1 named, 2 partial
    kv.free(a)  # freed tail first: partial 2 on top of never-used 3; named 1, then 0, cached
    b = req("b", [20, 21, 22, 23, 24, 25, 26])  # no hit: needs 4 blocks
    assert kv.find_cached_prefix(b) == []
    # Blocks holding nothing worth keeping first (the most recently freed, then never-used),
    # cached ones only when those run out.
    assert admit(kv, b) == [2, 3, 1, 0]
    # a's blocks were evicted, its tail block (1) before its head (0).
    assert kv.pool.num_evictions == 2
    assert kv.find_cached_prefix(req("c", [10, 11, 12, 13, 14])) == []


def test_with_prefix_caching_off_names_die_with_their_last_holder() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    root = namespace_root(None, "private-0")
    a, b = req("a", list(range(100, 110)), root), req("b", list(range(100, 110)), root)
    admit(kv, a)
    assert admit(kv, b)[:2] == [0, 1]  # samples of one request still share
    kv.free(a)
    assert kv.pool.num_cached_blocks == 2  # b still holds them
    kv.free(b)
    assert kv.pool.num_cached_blocks == 0
    kv.check_integrity(live_request_ids=set())


def test_reset_forgets_names_and_never_renames_held_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(100, 106)))
    admit(kv, a)
    kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 0
    # a fills its partial block: it stays unnamed (its contents are not trusted).
    for t in (7, 7):
        a.append_output_token(t)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert kv.pool.num_cached_blocks == 0
    kv.check_integrity(live_request_ids={"a"})


# -- scheduler -------------------------------------------------------------------------------
def make_scheduler(num_blocks: int = 16, budget: int = 64) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
        KVCacheManager(num_blocks, block_size=4),
    )


def test_a_request_starts_after_its_cached_prefix() -> None:
    sched = make_scheduler()
    sched.add_request(req("a", list(range(100, 110))))
    out = sched.schedule()
    assert plan(out) == [("a", 0, 10)]
    sample_all(sched, out)
    b = req("b", [*range(100, 108), 1, 2, 3])
    sched.add_request(b)
    out = sched.schedule()
    assert plan(out) == [("a", 10, 1), ("b", 8, 3)]
    assert b.num_cached_tokens == 8
    assert out.scheduled[1].block_table[:2] == [0, 1]
    sample_all(sched, out)


def test_a_prefix_being_chunked_is_computed_once() -> None:
    # Budget 8 chunks a's 13-token prompt. b has the same prompt (like the second sample of an
    # n > 1 request): it is admitted in the step that schedules a's last chunk, which names
    # blocks 0-2, so b computes only its last token; c, another prompt, fills the budget.
    sched = make_scheduler(budget=8)
    prompt = list(range(100, 113))
    a, b, c = req("a", prompt), req("b", prompt), req("c", [9, 9])
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert plan(out) == [("a", 0, 8)]
    sample_all(sched, out)
    out = sched.schedule()
    assert plan(out) == [("a", 8, 5), ("b", 12, 1), ("c", 0, 2)]
    assert b.num_cached_tokens == 12
    assert sched.kv_cache.get_block_table("b")[:3] == sched.kv_cache.get_block_table("a")[:3]
    sample_all(sched, out)


def test_preempting_a_request_keeps_blocks_others_share() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        KVCacheManager(num_blocks=4, block_size=4),
    )
    a, b = req("a", [*range(100, 108), 1]), req("b", [*range(100, 108), 2])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert plan(out) == [("a", 0, 9), ("b", 8, 1)]  # b joins a's blocks in the same step
    assert sched.kv_cache.get_block_table("b") == [0, 1, 3]
    sample_all(sched, out)
    for _ in range(3):  # a and b fill their third blocks: 12 tokens each
        out = sched.schedule()
        sample_all(sched, out)
    out = sched.schedule()  # both need a fourth block; none is free: b is preempted
    assert out.preempted == [b]
    assert sched.kv_cache.pool.ref_counts[[0, 1]].tolist() == [1, 1]  # a still holds them
    sample_all(sched, out)
    sched.finish_requests(["a"], "abort")  # type: ignore[arg-type]
    out = sched.schedule()
    # a took b's freed block 3 (evicting its name), so b comes back from the blocks it
    # shared with a, 0 and 1, still cached after a's abort.
    assert plan(out)[0][:2] == ("b", 8)
    sched.check_integrity()
