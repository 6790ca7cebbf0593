"""Seeded sampling is reproducible whatever shares the batch; n > 1; sampling controls."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convoy import LLM, SamplingParams
from convoy.model.sampler import Sampler, SamplingRow

PROMPT = [5, 17, 42, 99, 123, 7]


@pytest.fixture(scope="module")
def llm(make_checkpoint: Callable[..., Path]) -> LLM:
    return LLM(model=str(make_checkpoint("llama")), max_model_len=256)


def other_prompts(k: int) -> list[list[int]]:
    return [[(13 * i + 7 * j) % 500 + 5 for j in range(3 + i % 40)] for i in range(k)]


def test_same_seed_same_tokens_alone_or_among_32(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids

    # 31 other requests, some seeded differently, some unseeded, with other settings.
    others = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=5 + i % 20, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=1.2, top_k=50, max_tokens=30, ignore_eos=True)
        for i in range(31)
    ]
    prompts = other_prompts(31)
    prompts.insert(17, PROMPT)
    others.insert(17, params)
    batch = llm.generate(prompts, others, use_tqdm=False)
    assert batch[17].outputs[0].token_ids == alone

    again = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    different = llm.generate([PROMPT], params.clone(seed=99), use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone


def test_n_samples_share_a_prompt_and_differ(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Sample 0 of n=4 is the n=1 request with the same seed: reproducible per sample.
    single = llm.generate([PROMPT], params.clone(n=1), use_tqdm=False)[0]
    assert single.outputs[0].token_ids == out.outputs[0].token_ids
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_greedy_n_gives_identical_samples(llm: LLM) -> None:
    (out,) = llm.generate([PROMPT], SamplingParams(n=3, temperature=0, max_tokens=8), False)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1


def test_top_k_1_is_greedy(llm: LLM) -> None:
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    top1 = llm.generate(
        [PROMPT], SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True, seed=3)
    )
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_logit_bias_forces_a_token_and_min_tokens_blocks_eos(llm: LLM) -> None:
    eos = llm.get_tokenizer().eos_token_id
    assert eos is not None
    forced = SamplingParams(temperature=0, max_tokens=6, logit_bias={eos: 100.0})
    out = llm.generate([PROMPT], forced, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    held = forced.clone(min_tokens=3)
    out = llm.generate([PROMPT], held, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:3]
    ignoring = forced.clone(ignore_eos=True)
    out = llm.generate([PROMPT], ignoring, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] * 6 and out.finish_reason == "length"


def test_repetition_penalties_change_greedy_output(llm: LLM) -> None:
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = llm.generate([PROMPT], base, use_tqdm=False)[0].outputs[0].token_ids
    for change in ({"repetition_penalty": 5.0}, {"frequency_penalty": 2.0}):
        got = llm.generate([PROMPT], base.clone(**change), use_tqdm=False)[0].outputs[0].token_ids
        assert got != plain, change
    # A strong presence penalty forbids repeats among the outputs in practice.
    strong = base.clone(presence_penalty=2.0, repetition_penalty=100.0)
    got = llm.generate([PROMPT], strong, use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(got)) == len(got)


def test_logprobs_top_k_shape(llm: LLM) -> None:
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=5, logprobs=3, ignore_eos=True)
    comp = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == 5
    total = 0.0
    for token, pos in zip(comp.token_ids, comp.logprobs, strict=True):
        assert token in pos
        # The top 3 plus the sampled token, which may be one of them.
        ranks = sorted(lp.rank for lp in pos.values() if lp.rank is not None)
        assert ranks[:3] == [1, 2, 3] and len(pos) == (3 if pos[token].rank <= 3 else 4)
        total += pos[token].logprob
    assert comp.cumulative_logprob == pytest.approx(total)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("top_k", -2),
        ("min_p", 2.0),
        ("max_tokens", -1),
        ("presence_penalty", 3.0),
        ("repetition_penalty", 0.0),
        ("logprobs", -1),
    ],
)
def test_invalid_sampling_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("seeded", [False, True])
def test_sampler_draws_follow_the_distribution(seeded: bool) -> None:
    """4000 draws from a known distribution (after temperature and min_p) land on each token
    about as often as its probability says, and never on a token of probability zero."""
    want = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0])
    logits = torch.log(want).clamp(min=-1e4)
    # Temperature 0.5 squares the probabilities (renormalized); min_p 0.05 then cuts the tokens
    # below 0.05 * max, here the one of 0.1 ** 2 / sum.
    tempered = want**2 / (want**2).sum()
    tempered[tempered < 0.05 * tempered.max()] = 0
    tempered /= tempered.sum()
    sampler = Sampler(vocab_size=6, device=torch.device("cpu"), seed=0)
    draws = []
    for step in range(40):
        rows = [
            SamplingRow(
                params=SamplingParams(
                    temperature=0.5, min_p=0.05, seed=1000 * step + i if seeded else None
                ),
                prompt_token_ids=[1],
                output_token_ids=[],
                eos_token_ids=frozenset(),
                draw_index=step,
            )
            for i in range(100)
        ]
        tokens, _ = sampler(logits.expand(100, -1).clone(), rows)
        draws += tokens
    freq = torch.bincount(torch.tensor(draws), minlength=6).double() / len(draws)
    assert freq[tempered == 0].sum() == 0
    # Binomial standard deviation of a frequency is at most 0.008 here: 4 sigma.
    torch.testing.assert_close(freq, tempered.double(), atol=0.032, rtol=0)
