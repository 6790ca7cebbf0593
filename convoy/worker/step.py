"""What the runner reads of a scheduled step, and what it gives back.

The runner takes the scheduler's plan through the protocols below, which name the fields it
reads and nothing else: the engine's ``SchedulerOutput`` satisfies them as it is, and a
plan sent to another process (a tensor-parallel rank) can be any object that does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from convoy.sampling_params import SamplingParams


class StepRequest(Protocol):
    """A request as the runner sees it: its tokens and how to sample the next one."""

    @property
    def request_id(self) -> str: ...
    @property
    def sampling_params(self) -> SamplingParams: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    @property
    def output_token_ids(self) -> list[int]: ...
    @property
    def all_token_ids(self) -> list[int]: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def num_prompt_tokens(self) -> int: ...


class ScheduledChunk(Protocol):
    """One request's share of a step: tokens ``[start, start + num_tokens)`` are computed,
    their keys and values stored in the blocks of ``block_table``."""

    @property
    def request(self) -> StepRequest: ...
    @property
    def start(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def block_table(self) -> list[int]: ...
    @property
    def token_ids(self) -> Sequence[int]:
        """The chunk's input tokens: known ones, then the ``num_draft`` proposed ones."""
        ...

    @property
    def num_draft(self) -> int:
        """Proposed tokens at the end of the chunk, verified by this step (speculation)."""
        ...

    @property
    def draft_token_ids(self) -> Sequence[int]: ...
    @property
    def samples(self) -> bool:
        """The step reaches the end of the request's known tokens: a new one is sampled, and
        with drafts one per proposed token too."""
        ...


class StepPlan(Protocol):
    @property
    def scheduled(self) -> Sequence[ScheduledChunk]: ...
    @property
    def finished_request_ids(self) -> Sequence[str]:
        """Requests that ended since the previous step: the runner drops their state."""
        ...

    @property
    def is_empty(self) -> bool: ...


class PhaseTimes(Protocol):
    """Where the runner writes its phases' seconds (the engine's step profile)."""

    prepare: float
    forward: float
    logits: float
    sample: float


@dataclass
class TokenLogprobs:
    """Log-probability of one chosen token plus the top-k alternatives (ids, logprobs)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class ModelOutput:
    # Per request, its new tokens: one, or with drafts the target's own tokens up to and
    # including the first that differs from the draft (the accepted drafts, then one more).
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # For prompt tokens ``first .. first+len-1`` of the request (first >= 1).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
