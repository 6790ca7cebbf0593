"""The bfloat16 and int8 screens of the vocabulary projection pick the float32 argmax, token for
token: on random heads at any scale, on near-ties far below the screens' resolution, on exact
ties (the first index, as torch.argmax), on rows with outliers, and they hand back rows they
cannot settle (non-finite values, near-flat logits) for the full projection. The int8 bound
holds logit by logit. In the engine greedy outputs are the same with either screen or none,
or with every row handed back, beside sampled and logprob rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convoy import LLM, SamplingParams
from convoy.bench.memory import memory_report
from convoy.model import cpu_kernels, greedy_head
from convoy.model.greedy_head import (
    Bf16GreedyHead,
    Int8GreedyHead,
    MixedGreedyHead,
    ScreenedGreedyHead,
    error_factor,
    screen_kind,
)
from convoy.model.linear import onednn_available

needs_bf16 = pytest.mark.skipif(
    not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="torch built without oneDNN's bfloat16 matmul",
)
KINDS = [
    pytest.param("bfloat16", marks=needs_bf16),
    pytest.param("mixed", marks=needs_bf16),
    # oneDNN's int8 matmul runs (emulated, slower) on CPUs without VNNI too.
    pytest.param(
        "int8", marks=pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN")
    ),
]
HEADS: dict[str, type[ScreenedGreedyHead]] = {
    "bfloat16": Bf16GreedyHead,
    "int8": Int8GreedyHead,
    "mixed": MixedGreedyHead,
}
needs_a_screen = pytest.mark.skipif(
    screen_kind() is None, reason="the engine screens only on CPUs with native bfloat16 or int8"
)


def _head(weight: torch.Tensor, kind: str) -> ScreenedGreedyHead:
    kernel = cpu_kernels.load()
    assert kernel is not None
    return HEADS[kind](weight, kernel)


def _float32_argmax(x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    return torch.nn.functional.linear(x, weight).argmax(dim=-1).tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden,vocab", [(64, 512), (384, 4099), (1000, 1037)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_screen_picks_the_float32_argmax(kind: str, hidden: int, vocab: int, scale: float) -> None:
    torch.manual_seed(hidden + vocab)
    weight = torch.randn(vocab, hidden) * 0.02
    head = _head(weight, kind)
    x = torch.randn(67, hidden) * scale
    got = head(x).tolist()
    assert got == _float32_argmax(x, weight)


@pytest.mark.parametrize("kind", KINDS)
def test_near_ties_below_the_screens_resolution_go_to_the_float32_winner(kind: str) -> None:
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
    head = _head(weight, kind)
    want = _float32_argmax(x, weight)
    assert all(w != t for w, t in zip(want, top, strict=True))  # every rival now wins
    assert head(x).tolist() == want


@pytest.mark.parametrize("kind", KINDS)
def test_exact_ties_go_to_the_first_index(kind: str) -> None:
    torch.manual_seed(1)
    weight = torch.randn(500, 128) * 0.02
    x = torch.randn(1, 128)
    t = _float32_argmax(x, weight)[0]
    for twin in (0, 499) if t not in (0, 499) else (250,):
        w = weight.clone()
        w[twin] = w[t]
        assert _head(w, kind)(x).tolist() == [min(twin, t)]


@pytest.mark.parametrize("kind", KINDS)
def test_rows_it_cannot_settle_come_back_as_minus_one(kind: str) -> None:
    torch.manual_seed(2)
    weight = torch.randn(2000, 64) * 0.02
    x = torch.randn(4, 64)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    got = _head(weight, kind)(x).tolist()
    assert got[1] == got[2] == -1
    assert [got[0], got[3]] == _float32_argmax(x[[0, 3]], weight)
    # A NaN in the head reaches every row's screen.
    bad = weight.clone()
    bad[7, 0] = float("nan")
    assert _head(bad, kind)(x[[0]]).tolist() == [-1]
    # Flat logits: every token is within reach of the top, more than the screen takes on.
    flat = torch.ones(greedy_head.MAX_CANDIDATES + 1, 64)
    assert _head(flat, kind)(x[[0]]).tolist() == [-1]
    assert _head(flat[:100], kind)(x[[0]]).tolist() == [0]  # few enough: the first wins
    # A zero row: every logit is 0, all tokens tie.
    assert _head(flat[:100], kind)(torch.zeros(1, 64)).tolist() == [0]


def test_int8_bound_holds_for_every_logit() -> None:
    """|y_j - a_j| <= E_j for every token, with y the float32 logit and a, E as the kernel
    computes them, on rows of very different shapes: Gaussian, one huge outlier, tiny values,
    values of wildly different magnitudes; and a head with zero and outlier rows."""
    torch.manual_seed(3)
    hidden, vocab = 384, 3000
    weight = torch.randn(vocab, hidden) * 0.05
    weight[0] = 0
    weight[1, 7] = 40.0
    head = _head(weight, "int8")
    x = torch.randn(5, hidden)
    x[1, 11] = 300.0
    x[2] *= 1e-30
    x[3] *= torch.logspace(-6, 6, hidden)
    x[4] = 0
    x[4, 0] = 1.0
    qx, rows = head.kernel.quantize_rows_int8(x)
    acc = torch._int_mm(qx, head.qweight.t())
    sx, p, q = rows[:, :1], rows[:, 1:2], rows[:, 2:3]
    a = acc.float() * (sx * head.scale[None, :])
    e = p * head.residual_norm[None, :] + q * head.norm[None, :]
    y = torch.nn.functional.linear(x, weight)
    assert ((y - a).abs() <= e).all()
    exact = (x.double() @ weight.double().T).float()
    assert ((exact - a).abs() <= e).all()
    # Not vacuous: on the Gaussian row the bound is ~1.5% of |x| |w_j|.
    ratio = e[0] / (x[0].norm() * weight.norm(dim=1).clamp(min=1e-12))
    assert 0.005 < float(ratio[2:].median()) < 0.03
    assert head(x).tolist() == _float32_argmax(x, weight)


def test_error_factor_is_about_three_bfloat16_roundings() -> None:
    assert 3 * 2.0**-8 < error_factor(384) < 3.1 * 2.0**-8
    assert error_factor(8192) > error_factor(384)  # longer sums, more float32 rounding


@needs_bf16
def test_mixed_head_sends_rows_with_outliers_to_the_bfloat16_screen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(4)
    weight = torch.randn(5000, 384) * 0.05
    head = _head(weight, "mixed")
    assert isinstance(head, MixedGreedyHead)
    seen: dict[str, int] = {"int8": 0, "bfloat16": 0}

    def count(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def counted(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
            seen[name] += x.shape[0]
            return fn(x, *args)

        return counted

    monkeypatch.setattr(head.int8, "screen", count("int8", head.int8.screen))
    monkeypatch.setattr(head, "bf16", count("bfloat16", head.bf16))
    x = torch.randn(6, 384)
    x[[1, 4], 9] = 40.0  # ~40x the rows' RMS at one dimension
    assert head(x).tolist() == _float32_argmax(x, weight)
    assert seen == {"int8": 4, "bfloat16": 2}
    assert head(x[[0, 2]]).tolist() == _float32_argmax(x[[0, 2]], weight)  # all int8
    assert head(x[[1]]).tolist() == _float32_argmax(x[[1]], weight)  # all bfloat16
    assert seen == {"int8": 6, "bfloat16": 3}


@needs_a_screen
@pytest.mark.parametrize("kind", ["mixed", "int8", "bfloat16"])
def test_engine_greedy_outputs_are_the_same_with_the_screen(
    kind: str, make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind != "int8" and not greedy_head.fast_bf16():
        pytest.skip("no native bfloat16")
    monkeypatch.setattr(greedy_head, "screen_kind", lambda: kind)
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
        screen = llm.engine.runner.greedy_head
        if kwargs.get("greedy_screening", True):
            assert type(screen) is HEADS[kind]
        else:
            assert screen is None
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks
        return [o.outputs[0].token_ids for o in outs]

    full = run(greedy_screening=False)
    assert run() == full
    monkeypatch.setattr(greedy_head, "MAX_CANDIDATES", 0)  # every row back to the full head
    assert run() == full


@needs_a_screen
def test_memory_report_counts_the_screens_copy(make_checkpoint: Callable[..., Path]) -> None:
    path = make_checkpoint("llama")
    llm = LLM(model=str(path), max_model_len=128)
    screen = llm.engine.runner.greedy_head
    assert screen is not None
    vocab, hidden = screen.weight.shape
    on = memory_report(llm)
    off = memory_report(LLM(model=str(path), max_model_len=128, greedy_screening=False))
    # Untied: the plain float32 head stays beside the packed one, plus the screens' copies and
    # their per-token values (int8: scale, residual norm, norm; bfloat16: one bound factor).
    int8 = vocab * hidden + 3 * vocab * 4
    bf16 = vocab * hidden * 2 + vocab * 4
    own = {"int8": int8, "bfloat16": bf16, "mixed": int8 + bf16}[str(screen_kind())]
    assert on.weights_bytes - off.weights_bytes == vocab * hidden * 4 + own
