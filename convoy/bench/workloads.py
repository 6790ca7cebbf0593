"""Benchmark workloads as plain data: prompt token ids and exact output lengths.

A workload is a ``list[BenchRequest]``; nothing here depends on the engine. Prompts are token
ids, not text, so every engine (convoy, transformers, llama.cpp, vLLM) is fed exactly the same
tokens with no tokenizer round trip in between, and output lengths are exact because the
runners ignore EOS. :func:`save_jsonl` writes a workload in the format :func:`jsonl_workload`
reads, which is how a workload travels to another engine's harness.

Generated workloads are deterministic: the same arguments and seed give the same requests on
every machine (numpy's PCG64 generator, whose streams numpy keeps stable).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BenchRequest",
    "jsonl_workload",
    "random_workload",
    "save_jsonl",
    "shared_prefix_workload",
]


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt's token ids and exactly how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a benchmark prompt needs at least one token")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record :func:`jsonl_workload` reads back."""
        return {"prompt_token_ids": list(self.prompt_token_ids), "output_len": self.output_len}


class Encoder(Protocol):
    """Anything that turns text into token ids (a Hugging Face tokenizer is one)."""

    def encode(self, text: str) -> list[int]: ...


def _allowed_ids(vocab_size: int, avoid_ids: Collection[int]) -> np.ndarray:
    """The token ids random prompts draw from: ``[0, vocab_size)`` without ``avoid_ids``.

    Special tokens (BOS, EOS, chat markers) are left out: an EOS inside a prompt would make
    peers that stop on it, or that treat it specially, behave differently from convoy.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(sorted(avoid_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("every token id of the vocabulary is excluded; nothing left to draw")
    return allowed


def _check_range(name: str, bounds: tuple[int, int], minimum: int) -> tuple[int, int]:
    lo, hi = bounds
    if lo < minimum or hi < lo:
        raise ValueError(f"{name} must satisfy {minimum} <= min <= max, got {bounds}")
    return lo, hi


def _draw_tokens(rng: np.random.Generator, allowed: np.ndarray, n: int) -> list[int]:
    return [int(t) for t in allowed[rng.integers(0, allowed.size, size=n)]]


def random_workload(
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
    avoid_ids: Collection[int] = (),
) -> list[BenchRequest]:
    """``num_prompts`` prompts of uniformly random token ids.

    Input and output lengths are drawn uniformly from the inclusive ranges ``(min, max)``;
    token ids uniformly from ``[0, vocab_size)`` minus ``avoid_ids`` (pass the tokenizer's
    special ids). Deterministic given the arguments.
    """
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    in_lo, in_hi = _check_range("input_len_range", input_len_range, 1)
    out_lo, out_hi = _check_range("output_len_range", output_len_range, 1)
    allowed = _allowed_ids(vocab_size, avoid_ids)
    rng = np.random.default_rng(seed)
    # All lengths first, then the tokens: the lengths of request i never depend on how many
    # tokens earlier requests consumed from the stream.
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    return [
        BenchRequest(_draw_tokens(rng, allowed, int(n_in)), int(n_out))
        for n_in, n_out in zip(input_lens, output_lens, strict=True)
    ]


def shared_prefix_workload(
    num_groups: int,
    prefix_len: int,
    suffix_len: int,
    requests_per_group: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
    avoid_ids: Collection[int] = (),
) -> list[BenchRequest]:
    """``num_groups`` groups of ``requests_per_group`` prompts sharing a group prefix.

    Each group has its own random ``prefix_len``-token prefix; each request appends its own
    random ``suffix_len``-token suffix (a system prompt followed by a user turn, say). Every
    request generates ``output_len`` tokens. Requests come group by group, in order, so an
    engine with a prefix cache finds the prefix warm after a group's first request.
    """
    if num_groups < 0 or requests_per_group < 0:
        raise ValueError("num_groups and requests_per_group must be >= 0")
    if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len < 1:
        raise ValueError("prefix_len and suffix_len must be >= 0 with at least one token in all")
    allowed = _allowed_ids(vocab_size, avoid_ids)
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_groups):
        prefix = _draw_tokens(rng, allowed, prefix_len)
        for _ in range(requests_per_group):
            requests.append(
                BenchRequest(prefix + _draw_tokens(rng, allowed, suffix_len), output_len)
            )
    return requests


def jsonl_workload(
    path: str | Path, tokenizer: Encoder | None, output_len: int | None
) -> list[BenchRequest]:
    """Read a workload from a JSON Lines file.

    Each non-blank line is an object with either ``"prompt"`` (text, encoded with
    ``tokenizer`` exactly as a plain text prompt would be, BOS included) or
    ``"prompt_token_ids"``, and optionally ``"output_len"``, which overrides ``output_len``.
    ``tokenizer`` may be ``None`` when every line gives token ids; ``output_len`` may be
    ``None`` when every line gives its own. Errors name the line.
    """
    requests = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                requests.append(_parse_line(json.loads(line), tokenizer, output_len))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
    return requests


def _parse_line(record: Any, tokenizer: Encoder | None, default_len: int | None) -> BenchRequest:
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    n = record.get("output_len", default_len)
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"no integer output_len (line has {n!r} and no default was given)")
    if "prompt_token_ids" in record:
        ids = record["prompt_token_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise TypeError("prompt_token_ids must be a list of integers")
        return BenchRequest(list(ids), n)
    if "prompt" in record:
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        if not isinstance(record["prompt"], str):
            raise TypeError("prompt must be a string")
        return BenchRequest(list(tokenizer.encode(record["prompt"])), n)
    raise KeyError("each line needs 'prompt' or 'prompt_token_ids'")


def save_jsonl(requests: Sequence[BenchRequest], path: str | Path) -> None:
    """Write ``requests`` as JSON Lines that :func:`jsonl_workload` reads back unchanged."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict()) + "\n")
