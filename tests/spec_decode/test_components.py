"""Speculation's parts without a model: scheduling and rollback with exact block ids, the
proposers, the draft-length controller, the config's errors."""

from __future__ import annotations

import pytest

from convoy.config import SpeculativeConfig, parse_speculative_config
from convoy.engine.spec_decode.controller import (
    PROBE_EVERY,
    Candidate,
    DraftLengthController,
)
from convoy.engine.spec_decode.proposers import NgramProposer, OracleProposer
from convoy.model.sampler import seeded_uniform
from convoy.worker.runner import num_accepted
from tests.engine.test_scheduler import make_request, make_scheduler


def test_drafts_are_scheduled_and_rejected_rows_roll_back() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    r = make_request("a", prompt_len=6, max_tokens=20)
    sched.add_request(r)
    out = sched.schedule()  # the prompt
    sched.update_from_output(out, {"a": [50]})
    assert r.num_computed_tokens == 6 and r.num_tokens == 7
    assert sched.kv_cache.get_block_table("a") == [0, 1]

    # 1 + 5 rows: positions 6..11 need a third block.
    r.num_spec_tokens = 5
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_tokens, s.num_draft) == (6, 6, 5)
    assert sched.kv_cache.get_block_table("a") == [0, 1, 2]
    s.draft_token_ids = [51, 52, 60, 61, 62]
    assert s.token_ids == [50, 51, 52, 60, 61, 62]
    assert s.samples
    # The target agreed with two drafts, then said 53: three new tokens.
    sched.update_from_output(out, {"a": [51, 52, 53]})
    assert r.output_token_ids == [50, 51, 52, 53]
    assert r.num_computed_tokens == 9  # positions 0..8 hold the right keys and values
    assert sched.kv_cache.get_block_table("a") == [0, 1, 2]
    sched.check_integrity()

    # Both drafts rejected: only the decode's own row counts.
    r.num_spec_tokens = 2
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_tokens) == (9, 3)
    sched.update_from_output(out, {"a": [70]})
    assert r.num_computed_tokens == 10 and r.num_tokens == 11
    sched.check_integrity()


def test_a_rejected_tail_gives_its_blocks_back() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    r = make_request("a", prompt_len=7, max_tokens=20)
    sched.add_request(r)
    sched.update_from_output(sched.schedule(), {"a": [50]})
    assert sched.kv_cache.get_block_table("a") == [0, 1]
    r.num_spec_tokens = 6  # positions 7..13: blocks 2 and 3
    out = sched.schedule()
    assert sched.kv_cache.get_block_table("a") == [0, 1, 2, 3]
    sched.update_from_output(out, {"a": [99]})  # first draft rejected
    assert r.num_computed_tokens == 8
    assert sched.kv_cache.get_block_table("a") == [0, 1]
    assert sched.kv_cache.pool.num_free_blocks == 6
    sched.check_integrity()


def test_drafts_never_pass_max_tokens_or_the_budget() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, budget=3)
    r = make_request("a", prompt_len=2, max_tokens=4)
    sched.add_request(r)
    sched.update_from_output(sched.schedule(), {"a": [50]})
    r.num_spec_tokens = 8
    (s,) = sched.schedule().scheduled
    assert s.num_draft == 2  # the budget: 3 rows
    sched2 = make_scheduler(num_blocks=16, block_size=4, budget=64)
    r2 = make_request("b", prompt_len=2, max_tokens=3)
    sched2.add_request(r2)
    sched2.update_from_output(sched2.schedule(), {"b": [50]})
    r2.num_spec_tokens = 8
    (s2,) = sched2.schedule().scheduled
    # One output so far, three allowed: two more rows at most, so the draft is one token.
    assert s2.num_draft == 1


def test_stop_token_inside_the_accepted_drafts_ends_the_request() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    r = make_request("a", prompt_len=3, max_tokens=20)
    sched.add_request(r)
    sched.update_from_output(sched.schedule(), {"a": [50]})
    r.num_spec_tokens = 4
    out = sched.schedule()
    out.scheduled[0].draft_token_ids = [51, 2, 53, 54]
    # EOS (2) is the second new token: the rest are never produced.
    sched.update_from_output(out, {"a": [51, 2, 53]})
    assert r.output_token_ids == [50, 51, 2]
    assert r.is_finished and r.finish_reason is not None
    assert sched.kv_cache.pool.num_free_blocks == 8
    sched.check_integrity()


def test_num_accepted() -> None:
    assert num_accepted([], [5]) == 0
    assert num_accepted([1, 2, 3], [1, 2, 3, 4]) == 3
    assert num_accepted([1, 9, 3], [1, 2, 3, 4]) == 1
    assert num_accepted([9], [1, 2]) == 0


def test_ngram_finds_the_latest_longest_match() -> None:
    ngram = NgramProposer(min_n=2, max_n=3)
    #        0  1  2  3  4  5  6  7  8  9 10
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3]
    # Suffix [1, 2, 3] occurs at 0: what followed it was 4, 9.
    assert ngram.propose(tokens, 2, "a") == [4, 9]
    # With max_n = 2 the suffix [2, 3] matches, latest at 5: 5, 1, 2 followed it.
    assert NgramProposer(2, 2).propose(tokens, 3, "a") == [5, 1, 2]
    assert ngram.propose([1, 2, 3, 4], 3, "b") == []
    assert ngram.propose([7, 7, 7, 7], 2, "c") == [7]  # the match must end before the suffix
    # A request's index grows with its tokens: the new n-grams count, the latest wins.
    grown = [1, 2, 3, 4, 1, 2, 3, 8, 1, 2]
    assert ngram.propose(grown[:7], 2, "d") == [4, 1]
    assert ngram.propose(grown, 2, "d") == [3, 8]
    ngram.forget("d")
    assert ngram.propose([5, 6, 5], 2, "d") == []


def test_oracle_errs_at_its_rate_and_is_deterministic() -> None:
    ref = list(range(100, 1100))
    for rate in (0.0, 0.5, 1.0):
        oracle = OracleProposer(rate, seed=3, vocab_size=5000)
        oracle.set_references({(1, 2): ref})
        got = oracle.propose([1, 2], [], 1000)
        wrong = sum(g != t for g, t in zip(got, ref, strict=True)) / 1000
        assert abs(wrong - rate) < 0.06
        assert got == oracle.propose([1, 2], [], 1000)
    assert OracleProposer(0.0, 0, 10).propose([3], [], 4) == []  # no reference


def test_seeded_uniform_is_uniform_and_fixed() -> None:
    draws = [seeded_uniform(42, i) for i in range(20000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01
    assert seeded_uniform(42, 7) == draws[7]
    assert seeded_uniform(43, 7) != draws[7]
    assert seeded_uniform(-(2**63), 0) != seeded_uniform(2**64 - 1, 0)


def test_controller_drafts_when_rows_are_cheap_and_not_when_compute_bound() -> None:
    cheap = DraftLengthController(adaptive=True)
    # Each size twice: the first step of a size is never counted (it may compile a kernel).
    for rows in (1, 3, 5, 2, 6) * 2:
        cheap.observe_step(rows, 0.010 + 0.0001 * rows)  # bandwidth-bound: rows nearly free
    for _ in range(2):
        cheap.observe_draft(4, 4, 0.002)
        cheap.observe_draft(2, 2, 0.001)
    one = [Candidate("a", 4, free=False)]
    assert cheap.choose(one, base_rows=1) == {"a": 4}

    bound = DraftLengthController(adaptive=True)
    for rows in (16, 40, 64, 100) * 2:
        bound.observe_step(rows, 0.001 + 0.001 * rows)  # every row costs as much as the rest
    many = [Candidate(str(i), 4, free=True) for i in range(64)]
    assert set(bound.choose(many, base_rows=64).values()) == {0}
    # One step in PROBE_EVERY measures the other end of the line: one draft each.
    probes = [bound.choose(many, base_rows=64) for _ in range(PROBE_EVERY)]
    assert sum(set(p.values()) == {1} for p in probes) == 1

    # A request that never accepts stops drafting even when rows are cheap.
    for _ in range(20):
        cheap.observe_request("b", 4, 0)
    assert cheap.choose([Candidate("b", 4, free=False)], base_rows=1) == {"b": 0}


def test_fixed_draft_length_when_not_adaptive() -> None:
    c = DraftLengthController(adaptive=False)
    c.observe_step(64, 1.0)
    assert c.choose([Candidate("a", 3, free=False)], base_rows=64) == {"a": 3}


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('{"method": "eagle"}', "speculative method must be one of"),
        ('{"method": "draft_model"}', "needs a draft 'model'"),
        ('{"model": "x", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"model": "x", "tokens": 3}', "unknown speculative_config key"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup"),
    ],
)
def test_config_errors_name_the_problem(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_speculative_config(value, None)


def test_config_shapes() -> None:
    assert parse_speculative_config("none", "draft") is None
    assert parse_speculative_config("default", None) is None
    default = parse_speculative_config("default", "/d")
    assert default == SpeculativeConfig(model="/d", method="hybrid")
    auto = parse_speculative_config({"method": "auto", "model": "/d"}, None)
    assert auto is not None and auto.method == "hybrid"
    ngram = parse_speculative_config('{"method": "auto"}', None)
    assert ngram is not None and ngram.method == "ngram" and not ngram.uses_draft_model


def test_controller_stops_drafting_where_steps_without_drafts_did_better() -> None:
    c = DraftLengthController(adaptive=True)
    for rows in (1, 5) * 3:
        c.observe_step(rows, 0.010 + 0.0001 * rows)  # the model: rows nearly free
    one = [Candidate("a", 4, free=True)]
    assert c.choose(one, base_rows=1) == {"a": 4}
    # What steps actually gave: 100 tokens/s drafting, 150 without; one of each is not
    # enough to go by (a slow first step).
    c.observe_outcome(1, drafted=True, tokens=2, seconds=0.02)
    c.observe_outcome(1, drafted=False, tokens=3, seconds=0.02)
    assert c.choose(one, base_rows=1)["a"] > 0
    for _ in range(2):
        c.observe_outcome(1, drafted=True, tokens=2, seconds=0.02)
        c.observe_outcome(1, drafted=False, tokens=3, seconds=0.02)
    plans = [c.choose(one, base_rows=1) for _ in range(PROBE_EVERY)]
    assert sum(p == {"a": 0} for p in plans) == PROBE_EVERY - 1  # probes retry the plan
    # Another load is judged on its own.
    assert c.choose([Candidate("b", 4, free=True)], base_rows=40)["b"] > 0
