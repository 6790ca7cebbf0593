"""A CPU kernel build that fails is never silent: one warning with the reason and what it
costs, the engine falls back to torch ops, and its backends say so."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from convoy import LLM, SamplingParams
from convoy.model import cpu_kernels


@pytest.fixture
def failed_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The next load() finds a compiler error, as an install missing a header would."""

    def broken(**_: object) -> None:
        raise RuntimeError("Error building extension 'convoy_cpu_kernels'\nvec.h: No such file")

    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    yield
    # monkeypatch restores the loaded module and the failure state after the test.


def test_a_failed_build_warns_once_with_reason_and_cost(
    failed_build: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="convoy.model.cpu_kernels"):
        assert cpu_kernels.load() is None
        assert cpu_kernels.load() is None  # decided once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Error building extension" in warnings[0] and "vec.h" not in warnings[0]
    assert "torch ops" in warnings[0] and "slower" in warnings[0]
    assert "Error building extension" in (cpu_kernels.unavailable_reason() or "")


def test_engine_without_kernels_runs_torch_ops_and_says_why(
    failed_build: None, make_checkpoint: Callable[..., Path]
) -> None:
    llm = LLM(model=str(make_checkpoint("llama")), max_model_len=128)
    backends = llm.engine.backends
    assert backends["attention"] == "torch" and backends["elementwise"] == "torch"
    assert backends["cpu_kernels_unavailable"].startswith("RuntimeError: Error building")
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
