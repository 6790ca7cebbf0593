"""Speculation inside the engine: the built-in pair, aborts at any step, bad drafts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from convoy import LLM, SamplingParams
from convoy.checkpoints import draft_model_path
from tests.spec_decode.test_exactness import assert_same

PYTHON_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n",
    'if __name__ == "__main__":\n',
    "def read_lines(path):\n    with open(path) as f:\n",
]


def test_default_model_speculates_with_its_draft() -> None:
    llm = LLM()
    spec = llm.engine.spec_config
    assert spec is not None and spec.method == "hybrid"
    assert Path(str(spec.model)) == draft_model_path()
    params = [
        SamplingParams(temperature=0, max_tokens=48),
        SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=48),
        SamplingParams(temperature=0, max_tokens=48, logprobs=2, stop=["\n\n"]),
    ] * 2
    got = llm.generate(PYTHON_PROMPTS, params, use_tqdm=False)
    off = LLM(speculative_config="none", batch_invariant="on")
    assert off.engine.speculator is None
    assert_same(got, off.generate(PYTHON_PROMPTS, params, use_tqdm=False))
    stats = llm.engine.speculator.stats  # type: ignore[union-attr]
    assert stats.num_accepted_tokens > 0
    assert sum(o.metrics.num_accepted_tokens for o in got) == stats.num_accepted_tokens


def test_a_named_model_does_not_speculate_unless_asked(
    make_checkpoint: Callable[..., Path],
) -> None:
    llm = LLM(model=str(make_checkpoint("llama")))
    assert llm.engine.speculator is None
    assert not llm.engine.batch_invariant


def test_abort_at_any_step_returns_every_block(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint("llama")
    llm = LLM(
        model=str(path),
        speculative_config={"model": str(path), "num_speculative_tokens": 4, "adaptive": False},
        block_size=16,
        max_num_seqs=8,
    )
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(12):
        engine.add_request(str(i), list(range(3, 20 + i)), params)
    finished: dict[str, int] = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        outs = engine.step()
        if step % 3 == 0:
            outs += engine.abort_request([str(step // 3), str(step // 3 + 6)])
        for o in outs:
            if o.finished:
                finished[o.request_id] = finished.get(o.request_id, 0) + 1
        engine.check_integrity()
    assert sorted(finished, key=int) == [str(i) for i in range(12)]
    assert set(finished.values()) == {1}  # each request ended exactly once
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks
    assert engine.speculator is not None and engine.speculator.draft is not None
    engine.step()  # like the runner, the draft drops finished requests at the next step
    assert engine.speculator.draft._state == {}


def test_a_draft_with_another_vocabulary_is_refused(
    make_checkpoint: Callable[..., Path],
) -> None:
    path = make_checkpoint("llama")
    other = make_checkpoint("llama", vocab_size=600)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(model=str(path), speculative_config={"model": str(other)})
