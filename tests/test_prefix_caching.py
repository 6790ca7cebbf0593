"""Prefix caching never changes outputs: on vs off, for every supported architecture.

The prompts share a 72-token prefix (4.5 blocks of 16, enough for shared-prefix decode
attention), one diverges from it in the middle of a block, one is repeated whole (fully cached
but its last token), and one request samples n=3 with a seed. Greedy tokens, sampled tokens
and logprobs (within 1e-5) must be the same with caching on (all at once, one at a time,
chunked, and with a pool so small that requests holding shared blocks are preempted) as with
it off; and the cache must actually have been used.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convoy import LLM, RequestOutput, SamplingParams
from convoy.engine.request import Request
from convoy.model.attention import base as attention_base
from tests.conftest import ARCH_CASES, TOKENIZER_VOCAB
from tests.test_fidelity import poison_kv_cache

BLOCK = 16


def prompts() -> list[list[int]]:
    rng = random.Random(7)

    def toks(n: int) -> list[int]:
        return [rng.randrange(5, TOKENIZER_VOCAB) for _ in range(n)]

    prefix = toks(72)
    repeated = toks(81)  # 5 full blocks + 1 token
    return [
        prefix + toks(20),
        prefix + toks(33),
        prefix[:24] + toks(30),  # diverges in the middle of block 1
        repeated,
        toks(70),  # shares nothing
        repeated,  # fully cached: only its last token is computed
        prefix,
    ]


GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
SAMPLED = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=16, ignore_eos=True, logprobs=2)


def run(llm: LLM, sequential: bool) -> list[RequestOutput]:
    ps = prompts()
    params = [GREEDY] * len(ps) + [SAMPLED]
    ps = [*ps, ps[0]]
    if sequential:
        return [
            llm.generate([p], [sp], use_tqdm=False)[0] for p, sp in zip(ps, params, strict=True)
        ]
    return llm.generate(ps, params, use_tqdm=False)


def summary(outs: list[RequestOutput]) -> list[Any]:
    return [
        [
            (
                c.token_ids,
                [{t: round(lp.logprob, 5) for t, lp in pos.items()} for pos in c.logprobs or []],
            )
            for c in o.outputs
        ]
        for o in outs
    ]


def assert_same(got: list[RequestOutput], want: list[RequestOutput], mode: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs], (
            f"{mode}: request {i} tokens differ"
        )
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.logprobs is not None and wc.logprobs is not None
            for gp, wp in zip(gc.logprobs, wc.logprobs, strict=True):
                assert gp.keys() == wp.keys(), f"{mode}: request {i} top tokens differ"
                for t in gp:
                    assert abs(gp[t].logprob - wp[t].logprob) < 1e-5, f"{mode}: request {i}"


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_prefix_caching_leaves_outputs_unchanged(
    case: str, make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_checkpoint(case)
    base: dict[str, Any] = {"model": str(path), "max_model_len": 256, "block_size": BLOCK}
    off = LLM(**base, enable_prefix_caching=False)
    poison_kv_cache(off)
    want = run(off, sequential=False)
    # n=3 shares its prompt even with caching off (the samples' private namespace).
    assert want[-1].num_cached_tokens == 0
    assert off.engine.kv_cache.pool.num_cached_blocks == 0  # nothing outlives its holders

    one_by_one = LLM(**base)
    poison_kv_cache(one_by_one)
    got = run(one_by_one, sequential=True)
    assert_same(got, want, "one at a time")
    cached = [o.num_cached_tokens for o in got]
    # prefix+20 is first; prefix+33 finds 4 blocks; the mid-block divergence finds block 0;
    # the repeat finds all 5 full blocks; the last prompt (prefix alone) finds 4 blocks; the
    # n=3 request repeats prompt 0, which is cached up to its last full block.
    assert cached == [0, 64, 16, 0, 0, 80, 64, 80]

    at_once = LLM(**base)
    poison_kv_cache(at_once)
    groups: list[int] = []  # sizes of the shared-prefix decode groups the runner formed
    shared_prefixes = attention_base.find_shared_prefixes

    def spy_groups(*args: Any) -> Any:
        result = shared_prefixes(*args)
        if result is not None:
            groups.extend(g.row_end - g.row_start for g in result.groups)
        return result

    monkeypatch.setattr(attention_base, "find_shared_prefixes", spy_groups)
    assert_same(run(at_once, sequential=False), want, "all at once")
    assert groups and max(groups) >= 3  # shared-prefix attention really ran

    chunked = LLM(**base, max_num_batched_tokens=BLOCK)
    poison_kv_cache(chunked)
    assert_same(run(chunked, sequential=False), want, "chunked")

    # 12 blocks of 16: the requests do not fit together, so some are preempted; record
    # whether a preempted request held blocks that another request shared at that moment.
    small = LLM(**base, num_kv_blocks=12, max_num_seqs=16)
    poison_kv_cache(small)
    scheduler = small.engine.scheduler
    shared_at_preemption: list[bool] = []
    preempt = scheduler._preempt

    def spy(request: Request) -> None:
        table = scheduler.kv_cache.get_block_table(request.request_id)
        shared_at_preemption.append(any(scheduler.kv_cache.pool.ref_counts[b] > 1 for b in table))
        preempt(request)

    monkeypatch.setattr(scheduler, "_preempt", spy)
    assert_same(run(small, sequential=False), want, "preempting")
    assert any(shared_at_preemption), shared_at_preemption
    for llm in (one_by_one, at_once, chunked, small):
        pool = llm.engine.kv_cache.pool
        assert pool.num_free_blocks == pool.num_blocks
        assert llm.engine.kv_cache.num_hit_tokens > 0


def test_n_samples_compute_the_prompt_once(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint("llama")
    prompt = random.Random(3).choices(range(5, TOKENIZER_VOCAB), k=1000)  # 62.5 blocks
    computed = {}
    for caching in (True, False):
        for n in (1, 8):
            llm = LLM(
                model=str(path),
                block_size=BLOCK,
                enable_prefix_caching=caching,
                max_model_len=1024,
            )
            params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)
            llm.generate([prompt], params, use_tqdm=False)
            computed[caching, n] = llm.engine.num_prompt_tokens_computed
    # n=1 computes 1000. Each other sample reuses the 62 full blocks and computes only the 8
    # tokens of the partial one: 1000 + 7 * 8 = 1056 (1.06x), with caching on or off. (A
    # block-aligned prompt recomputes its last full block per sample: the newest token's
    # logits are needed.)
    assert computed[True, 1] == computed[False, 1] == 1000
    assert computed[True, 8] == computed[False, 8] == 1000 + 7 * 8
    assert computed[True, 8] / computed[True, 1] <= 1.3
