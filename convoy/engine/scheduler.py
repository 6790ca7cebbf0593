"""Continuous batching with one token budget per step (Orca + Sarathi-Serve).

Policy only: this module decides who runs and how many tokens each computes; it never
touches tensors. Its result, :class:`SchedulerOutput`, is all the model runner needs.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from convoy.config import SchedulerConfig
from convoy.engine.kv_cache_manager import KVCacheManager
from convoy.engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens ``[start, start + num_tokens)`` are computed."""

    request: Request
    start: int  # num_computed_tokens before this step
    num_tokens: int  # the draft tokens included
    block_table: list[int]
    # Speculative decoding: the last ``num_draft`` tokens are proposed ones, not yet the
    # request's; their ids are filled in before the step runs (draft_token_ids).
    num_draft: int = 0
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """The input tokens of this chunk, proposed ones last."""
        known = self.request.all_token_ids[self.start : self.start + self.num_tokens]
        return known + self.draft_token_ids if self.num_draft else known

    @property
    def samples(self) -> bool:
        """True if this step reaches the end of the known tokens, so a new one is sampled
        (one per verified row with drafts)."""
        return self.start + self.num_tokens - self.num_draft == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests that finished since the previous step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decode-first scheduling under a per-step token budget.

    Each step:
      1. Running requests, oldest first, get the tokens they still need (one for a decode,
         a chunk for a prompt), limited by the budget. If the pool has no room for one, the
         newest running request is preempted (its blocks freed, to be recomputed later);
         the oldest request is thus never starved by younger ones.
      2. If nothing was preempted, waiting requests (FCFS) are admitted while budget, blocks
         and ``max_num_seqs`` allow; a long prompt is split into budget-sized chunks, so it
         never stalls running decodes.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(
        self,
        request_ids: Iterable[str],
        reason: FinishReason,
        stop_reason: int | str | None = None,
    ) -> list[Request]:
        """End these requests (abort, or a stop found outside the scheduler); unknown ids skip."""
        done = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            request.finish(reason, stop_reason)
            self._release(request)
            done.append(request)
        return done

    def _release(self, request: Request) -> None:
        """Remove a finished request from the queues and give its blocks back."""
        if request.request_id not in self.requests:
            return
        del self.requests[request.request_id]
        if request in self.running:
            self.running.remove(request)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self.kv_cache.free(request)
        self._finished_ids.append(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- scheduling --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            num_draft = self._num_draft(request, budget) if num_new == 1 else 0
            num_new += num_draft
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, num_new, num_draft))
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: no younger one is left to run

        # After a preemption the pool is full; admitting more would only thrash.
        if not out.preempted:
            budget = self._admit_waiting(out, budget)

        # Advance now, not after the forward pass: the tokens are committed to this step.
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_tokens
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting requests (FCFS) while budget, blocks and ``max_num_seqs`` allow.

        A request starts from the blocks the prefix cache already holds. Blocks are named as
        soon as a step is scheduled to fill them, and a prompt still being chunked takes all
        of the budget left, so a request is only admitted once every earlier request's prompt
        is fully scheduled: it never computes a block that an earlier one is about to compute
        (e.g. the samples of an ``n > 1`` request, or prompts with a common system prompt).
        """
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget

    def _num_draft(self, request: Request, budget: int) -> int:
        """Proposed tokens a decode verifies this step: what the speculator asked for, within
        the budget, and never a row past max_tokens or the context (so no output overshoots)."""
        if request.num_spec_tokens <= 0:
            return 0
        # max_tokens keeps every row inside the context too (prompt + max_tokens fits).
        room = min(budget - 1, request.max_tokens - request.num_output_tokens - 1)
        return max(0, min(request.num_spec_tokens, room))

    def _scheduled(self, request: Request, num_new: int, num_draft: int = 0) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            start=request.num_computed_tokens,
            num_tokens=num_new,
            block_table=self.kv_cache.get_block_table(request.request_id),
            num_draft=num_draft,
        )

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the KV, requeue at the front of the waiting queue."""
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> list[tuple[Request, list[int]]]:
        """Append the sampled tokens; finish requests that hit EOS/stop ids/max_tokens.

        Returns each request that sampled with the tokens it kept (finished ones included).
        """
        updated = []
        for s in out.scheduled:
            request = s.request
            tokens = sampled.get(request.request_id)
            if not tokens or request.is_finished:
                continue
            kept: list[int] = []
            if request.num_output_tokens >= request.max_tokens:
                # max_tokens=0 (prompt logprobs only): the prompt is done, nothing to sample.
                request.finish(FinishReason.LENGTH)
            for token in tokens:
                if request.is_finished:
                    break
                request.append_output_token(token)
                kept.append(token)
                request.check_stop_token()
            if s.num_draft and not request.is_finished:
                self._roll_back(request, s.start + len(kept))
            updated.append((request, kept))
            if request.is_finished:
                self._release(request)
        return updated

    def _roll_back(self, request: Request, num_computed: int) -> None:
        """After verifying drafts: only the rows up to the first rejected draft hold the right
        keys and values. The request resumes from there; blocks wholly past it go back."""
        request.num_computed_tokens = num_computed
        self.kv_cache.free_trailing(request, num_computed)

    def check_integrity(self) -> None:
        """KV pool invariants, and only live requests hold blocks."""
        self.kv_cache.check_integrity(set(self.requests))
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError("more running requests than max_num_seqs")
