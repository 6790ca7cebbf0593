"""Speculative decoding never changes outputs.

Every run here is compared with the same engine without speculation: token ids, finish
reasons and text identical, logprobs bitwise equal (rows are batch-invariant; 1e-6 is
the bar), the KV pool checked after every step
(conftest sets CONVOY_CHECK_INTEGRITY). The workload mixes what a sampler can be asked for:
greedy, seeded sampling with top-p/top-k/min-p and penalties, logit bias, min_tokens,
logprobs, stop strings and stop ids, n = 2; prompts share prefixes (prefix caching).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convoy import LLM, SamplingParams
from convoy.outputs import RequestOutput
from tests.conftest import ARCH_CASES

BLOCK = 16


def workload(n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """``n`` prompts (token ids) and their sampling parameters, deterministic."""
    base = [5, 17, 42, 99, 7, 3, 250, 31, 64, 128, 200, 11, 13, 77, 90, 101, 6, 8, 9, 10]
    prompts, params = [], []
    for i in range(n):
        length = 3 + (i * 7) % 37
        # Every third prompt repeats the shared head: blocks the prefix cache reuses.
        head = base if i % 3 == 0 else [(t * (i + 3)) % 500 + 1 for t in base]
        prompts.append([*(head * 3)[:length], i % 500 + 1])
        kind = i % 8
        max_tokens = 12 + (i * 5) % 20
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(
                temperature=0.8, top_p=0.9, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True
            )
        elif kind == 2:
            p = SamplingParams(
                temperature=1.0,
                top_k=20,
                min_p=0.02,
                repetition_penalty=1.3,
                presence_penalty=0.5,
                frequency_penalty=0.3,
                seed=2000 + i,
                max_tokens=max_tokens,
            )
        elif kind == 3:
            p = SamplingParams(temperature=0, logprobs=3, max_tokens=max_tokens, ignore_eos=True)
        elif kind == 4:
            p = SamplingParams(temperature=0, stop=["e", "("], max_tokens=max_tokens)
        elif kind == 5:
            p = SamplingParams(temperature=0.7, seed=3000 + i, n=2, max_tokens=max_tokens)
        elif kind == 6:
            p = SamplingParams(
                temperature=0,
                min_tokens=4,
                logit_bias={3: 2.0, 4: -5.0},
                stop_token_ids=[7, 8, 9],
                max_tokens=max_tokens,
            )
        else:
            p = SamplingParams(
                temperature=0.9,
                seed=4000 + i,
                logprobs=2,
                repetition_penalty=1.1,
                max_tokens=max_tokens,
            )
        params.append(p)
    return prompts, params


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    return llm.generate(prompts, params, use_tqdm=False)


def assert_same(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g.outputs) == len(w.outputs)
        for go, wo in zip(g.outputs, w.outputs, strict=True):
            assert go.token_ids == wo.token_ids, g.request_id
            assert go.finish_reason == wo.finish_reason, g.request_id
            assert go.text == wo.text, g.request_id
            assert (go.logprobs is None) == (wo.logprobs is None)
            if go.logprobs is not None and wo.logprobs is not None:
                assert len(go.logprobs) == len(wo.logprobs)
                for gp, wp in zip(go.logprobs, wo.logprobs, strict=True):
                    assert gp.keys() == wp.keys()
                    for t in gp:
                        assert gp[t].logprob == wp[t].logprob  # bitwise: batch-invariant
                        assert gp[t].rank == wp[t].rank


def engine(path: Path, spec: Any, **kwargs: Any) -> LLM:
    kwargs.setdefault("block_size", BLOCK)
    return LLM(
        model=str(path),
        speculative_config=spec,
        batch_invariant="on",
        **kwargs,
    )


@pytest.fixture(scope="module")
def llama(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def llama_draft(make_checkpoint: Callable[..., Path]) -> Path:
    # Another random model: its proposals are nearly always rejected.
    return make_checkpoint("llama", num_layers=1, hidden_size=32, intermediate_size=64, seed=7)


@pytest.mark.parametrize("max_num_seqs", [1, 4, 16, 64])
@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 4},
        {"model": "SELF", "num_speculative_tokens": 3},
        {"model": "DRAFT", "num_speculative_tokens": 5, "method": "hybrid"},
    ],
    ids=["ngram", "self-draft", "hybrid-random-draft"],
)
def test_speculation_changes_no_output(
    llama: Path, llama_draft: Path, spec: dict[str, Any], max_num_seqs: int
) -> None:
    n = {1: 8, 4: 16, 16: 32, 64: 64}[max_num_seqs]
    prompts, params = workload(n)
    spec = dict(spec)
    if spec.get("model") == "SELF":
        spec["model"] = str(llama)
    elif spec.get("model") == "DRAFT":
        spec["model"] = str(llama_draft)
    want = run(engine(llama, None, max_num_seqs=max_num_seqs), prompts, params)
    llm = engine(llama, spec, max_num_seqs=max_num_seqs)
    assert_same(run(llm, prompts, params), want)
    stats = llm.engine.speculator.stats  # type: ignore[union-attr]
    assert stats.num_draft_tokens > 0


@pytest.mark.parametrize("error_rate", [1.0, 0.5, 0.0])
def test_oracle_at_any_acceptance_changes_no_output(llama: Path, error_rate: float) -> None:
    prompts, params = workload(16)
    base = engine(llama, None, max_num_seqs=16)
    want = run(base, prompts, params)
    llm = engine(
        llama,
        {"method": "oracle", "num_speculative_tokens": 4, "oracle_error_rate": error_rate},
        max_num_seqs=16,
    )
    speculator = llm.engine.speculator
    assert speculator is not None and speculator.oracle is not None
    # The oracle knows what greedy/seeded decoding produces: the n = 1 outputs.
    speculator.oracle.set_references(
        {tuple(w.prompt_token_ids): w.outputs[0].token_ids for w in want}
    )
    assert_same(run(llm, prompts, params), want)
    stats = speculator.stats
    assert stats.num_draft_tokens > 0
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    if error_rate == 1.0:
        assert rate == 0.0
    if error_rate == 0.0:
        assert rate > 0.6  # n = 2's second samples and min_tokens rows miss


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_batched_tokens": 16},
        {"num_kv_blocks": 12, "max_num_seqs": 16},
        {"enable_prefix_caching": False},
    ],
    ids=["chunked-16", "preempting-pool", "no-prefix-cache"],
)
def test_under_chunking_preemption_and_caching(llama: Path, kwargs: dict[str, Any]) -> None:
    prompts, params = workload(24)
    kwargs = {"max_num_seqs": 8, **kwargs}
    want = run(engine(llama, None, **kwargs), prompts, params)
    llm = engine(llama, {"model": str(llama), "num_speculative_tokens": 4}, **kwargs)
    assert_same(run(llm, prompts, params), want)
    if "num_kv_blocks" in kwargs:
        assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("name", sorted(ARCH_CASES))
def test_every_architecture(make_checkpoint: Callable[..., Path], name: str) -> None:
    path = make_checkpoint(name)
    draft = make_checkpoint(name, num_layers=1, seed=11)
    prompts, params = workload(16)
    want = run(engine(path, None, max_num_seqs=8), prompts, params)
    for spec in ({"model": str(path)}, {"model": str(draft), "method": "hybrid"}):
        llm = engine(path, {**spec, "num_speculative_tokens": 3}, max_num_seqs=8)
        assert_same(run(llm, prompts, params), want)


def test_per_request_control(llama: Path) -> None:
    prompts, params = workload(8)
    llm = engine(llama, {"model": str(llama), "num_speculative_tokens": 4, "adaptive": False})
    off = [p.clone(speculative=False) for p in params]
    outs = run(llm, prompts, off)
    assert all(o.metrics.num_draft_tokens == 0 for o in outs)
    capped = [p.clone(max_speculative_tokens=1) for p in params]
    outs = run(llm, prompts, capped)
    for o in outs:
        steps = o.metrics.num_draft_tokens
        assert steps > 0
    assert_same(outs, run(engine(llama, None), prompts, params))
