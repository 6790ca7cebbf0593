"""The bfloat16 screen of the vocabulary projection picks the float32 argmax, token for token:
on random heads at any scale, on near-ties far below bfloat16's resolution, on exact ties (the
first index, as torch.argmax), and it hands back rows it cannot settle (non-finite values,
near-flat logits) for the full projection. In the engine greedy outputs are the same with the
screen on or off, or with every row handed back, beside sampled and logprob rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convoy import LLM, SamplingParams
from convoy.bench.memory import memory_report
from convoy.model import cpu_kernels, greedy_head
from convoy.model.greedy_head import ScreenedGreedyHead, error_factor, fast_bf16
from convoy.model.layers import onednn_available

needs_bf16 = pytest.mark.skipif(
    not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="torch built without oneDNN's bfloat16 matmul",
)
needs_fast_bf16 = pytest.mark.skipif(
    not fast_bf16(), reason="the engine screens only on CPUs with native bfloat16"
)


def _head(weight: torch.Tensor) -> ScreenedGreedyHead:
    kernel = cpu_kernels.load()
    assert kernel is not None
    return ScreenedGreedyHead(weight, kernel)


def _float32_argmax(x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    return torch.nn.functional.linear(x, weight).argmax(dim=-1).tolist()


@needs_bf16
@pytest.mark.parametrize("hidden,vocab", [(64, 512), (384, 4099), (1000, 1037)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_screen_picks_the_float32_argmax(hidden: int, vocab: int, scale: float) -> None:
    torch.manual_seed(hidden + vocab)
    weight = torch.randn(vocab, hidden) * 0.02
    head = _head(weight)
    x = torch.randn(67, hidden) * scale
    got = head(x).tolist()
    assert got == _float32_argmax(x, weight)


@needs_bf16
def test_near_ties_below_bfloat16_resolution_go_to_the_float32_winner() -> None:
    torch.manual_seed(0)
    hidden, vocab = 256, 3000
    weight = torch.randn(vocab, hidden) * 0.02
    x = torch.randn(8, hidden)
    top = _float32_argmax(x, weight)
    # For each row, a rival token whose logit beats the top one by ~1e-4 of it: bfloat16 sees
    # the two as equal (2^-8 apart at best), float32 does not.
    for r, t in enumerate(top):
        rival = (t + 1 + 37 * r) % vocab
        logit = float(weight[t] @ x[r])
        weight[rival] = weight[t] + x[r] / x[r].norm() ** 2 * abs(logit) * 1e-4
    head = _head(weight)
    want = _float32_argmax(x, weight)
    assert all(w != t for w, t in zip(want, top, strict=True))  # every rival now wins
    assert head(x).tolist() == want


@needs_bf16
def test_exact_ties_go_to_the_first_index() -> None:
    torch.manual_seed(1)
    weight = torch.randn(500, 128) * 0.02
    x = torch.randn(1, 128)
    t = _float32_argmax(x, weight)[0]
    for twin in (0, 499) if t not in (0, 499) else (250,):
        w = weight.clone()
        w[twin] = w[t]
        assert _head(w)(x).tolist() == [min(twin, t)]


@needs_bf16
def test_rows_it_cannot_settle_come_back_as_minus_one() -> None:
    torch.manual_seed(2)
    weight = torch.randn(2000, 64) * 0.02
    x = torch.randn(4, 64)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    got = _head(weight)(x).tolist()
    assert got[1] == got[2] == -1
    assert [got[0], got[3]] == _float32_argmax(x[[0, 3]], weight)
    # A NaN in the head reaches every row's screen.
    bad = weight.clone()
    bad[7, 0] = float("nan")
    assert _head(bad)(x[[0]]).tolist() == [-1]
    # Flat logits: every token is within reach of the top, more than the screen takes on.
    flat = torch.ones(greedy_head.MAX_CANDIDATES + 1, 64)
    assert _head(flat)(x[[0]]).tolist() == [-1]
    assert _head(flat[:100])(x[[0]]).tolist() == [0]  # few enough: all computed, first wins


def test_error_factor_is_about_three_bfloat16_roundings() -> None:
    assert 3 * 2.0**-8 < error_factor(384) < 3.1 * 2.0**-8
    assert error_factor(8192) > error_factor(384)  # longer sums, more float32 rounding


@needs_fast_bf16
def test_engine_greedy_outputs_are_the_same_with_the_screen(
    make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_checkpoint("llama3-tied-mqa")
    prompts = [[5 + (7 * i + j) % 400 for j in range(3 + 11 * i)] for i in range(6)]
    # Greedy rows beside rows the screen must leave alone: sampled, logprobs, penalties.
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=3),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, min_tokens=5),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    ]

    def run(**kwargs: bool) -> list[list[int]]:
        llm = LLM(model=str(path), max_model_len=256, **kwargs)
        screened = llm.engine.runner.greedy_head is not None
        assert screened == kwargs.get("greedy_screening", True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks
        return [o.outputs[0].token_ids for o in outs]

    full = run(greedy_screening=False)
    assert run() == full
    monkeypatch.setattr(greedy_head, "MAX_CANDIDATES", 0)  # every row back to the full head
    assert run() == full


@needs_fast_bf16
def test_memory_report_counts_the_screens_copy(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint("llama")
    llm = LLM(model=str(path), max_model_len=128)
    screen = llm.engine.runner.greedy_head
    assert screen is not None
    vocab, hidden = screen.weight.shape
    on = memory_report(llm)
    off = memory_report(LLM(model=str(path), max_model_len=128, greedy_screening=False))
    # Untied: the plain float32 head stays beside the packed one, plus the bfloat16 copy and
    # one bound per token.
    assert on.weights_bytes - off.weights_bytes == vocab * hidden * (4 + 2) + vocab * 4
