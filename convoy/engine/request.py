"""A request's state as the engine and the scheduler see it (no tensors)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from convoy.engine.prefix_cache import namespace_root
from convoy.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a sequence ended; the values are the OpenAI API's ``finish_reason`` strings."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # the caller aborted it (or a client disconnected)
    ERROR = "error"  # the engine could not serve it


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of a request's milestones."""

    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Speculative decoding: tokens proposed for this request, and how many the target kept.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class Request:
    """One sequence being generated.

    ``all_token_ids`` is the prompt followed by the output so far; ``num_computed_tokens``
    counts the leading tokens whose KV is in the cache. Each step the scheduler lets a
    request compute some of the rest: a chunk of the prompt, or the one newest token (a
    decode). A request is never in two phases: it simply catches up to ``num_tokens``.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int],
        max_tokens: int,
        arrival_time: float | None = None,
        cache_root: bytes | None = None,
        lookup_prefix_cache: bool = True,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens  # resolved: never None here
        self.all_token_ids: list[int] = list(prompt_token_ids)
        # The output part of all_token_ids, kept as its own list (read-only to everyone else)
        # so that readers every step (the sampler's rows) need not slice a growing list.
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Prefix cache: the root of this request's block-hash chain (its namespace), the names of
        # its full blocks so far (filled in by the KV cache manager), whether it may reuse
        # cached blocks (not when every prompt position must be computed, for prompt
        # logprobs), and how many prompt tokens it found cached when first scheduled.
        self.cache_root = cache_root if cache_root is not None else namespace_root()
        self.block_hashes: list[bytes] = []
        self.lookup_prefix_cache = lookup_prefix_cache
        self.num_cached_tokens: int | None = None
        # Speculative decoding: how many proposed tokens the next step may verify (set by the
        # speculator before scheduling), and those proposed ahead by a host-side proposer.
        self.num_spec_tokens = 0
        self.spec_token_ids: list[int] = []
        self.metrics = RequestMetrics()
        if arrival_time is not None:
            self.metrics.arrival_time = arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep only the first ``num_output_tokens`` outputs (a stop string ended the text
        inside a step's several tokens: those after it were never produced)."""
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens :]

    def check_stop_token(self) -> bool:
        """Finish on EOS / stop_token_ids / max_tokens after the newest token; True if finished.

        Stop strings are found by the detokenizer, which calls :meth:`finish` itself.
        """
        params = self.sampling_params
        if self.num_output_tokens >= self.max_tokens:
            self.finish(FinishReason.LENGTH)
            return True
        if self.num_output_tokens < params.min_tokens:
            return False
        last = self.all_token_ids[-1]
        if last in params.stop_token_ids:
            self.finish(FinishReason.STOP, stop_reason=last)
            return True
        if not params.ignore_eos and last in self.eos_token_ids:
            self.finish(FinishReason.STOP)
            return True
        return False

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        # A request ends exactly once: a second finish (say, an abort racing a stop) is ignored.
        if self.status is RequestStatus.FINISHED:
            return
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finish_time = time.time()

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
