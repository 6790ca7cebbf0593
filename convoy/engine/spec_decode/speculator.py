"""The speculator: each step, before scheduling, it picks every decode's draft length and
proposes what needs no model; after scheduling, the draft model fills in the rest; after the
step, it records what was accepted and what the step cost."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from convoy.config import SpeculativeConfig
from convoy.engine.request import Request
from convoy.engine.scheduler import SchedulerOutput
from convoy.engine.spec_decode.controller import Candidate, DraftLengthController
from convoy.engine.spec_decode.proposers import NgramProposer, OracleProposer
from convoy.worker.draft_runner import DraftJob, DraftRunner


@dataclass
class SpecDecodeStats:
    """Totals since the engine started (Prometheus counters)."""

    num_drafts: int = 0  # verify steps of one request with at least one proposed token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Accepted tokens per verify of one request: index a counts verifies accepting a.
    accepted_lengths: list[int] | None = None
    # The draft length chosen for the last step, summed over its requests, and how many.
    last_draft_tokens: int = 0
    last_num_requests: int = 0


class Speculator:
    def __init__(
        self, config: SpeculativeConfig, draft: DraftRunner | None, vocab_size: int
    ) -> None:
        self.config = config
        self.draft = draft
        self.ngram = (
            NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
            if config.method in ("ngram", "hybrid")
            else None
        )
        self.oracle = (
            OracleProposer(config.oracle_error_rate, config.oracle_seed, vocab_size)
            if config.method == "oracle"
            else None
        )
        self.controller = DraftLengthController(config.adaptive)
        k = config.num_speculative_tokens
        self.stats = SpecDecodeStats(accepted_lengths=[0] * (k + 1))

    def _max_k(self, request: Request) -> int:
        params = request.sampling_params
        if not params.speculative:
            return 0
        k = self.config.num_speculative_tokens
        if params.max_speculative_tokens is not None:
            k = min(k, params.max_speculative_tokens)
        # Never more rows than tokens the request may still produce.
        return max(0, min(k, request.max_tokens - request.num_output_tokens - 1))

    # -- before scheduling -------------------------------------------------------------------
    def plan(self, running: Sequence[Request]) -> None:
        """Set each running request's ``num_spec_tokens`` (and proposals that need no
        model) for the next step."""
        candidates: list[Candidate] = []
        proposals: dict[str, list[int]] = {}
        base_rows = 0
        for r in running:
            r.num_spec_tokens = 0
            r.spec_token_ids = []
            if r.num_tokens - r.num_computed_tokens != 1:
                continue  # still in its prompt: no decode to speculate on
            base_rows += 1
            max_k = self._max_k(r)
            if max_k == 0:
                continue
            proposal = self._host_proposal(r, max_k)
            if proposal:
                proposals[r.request_id] = proposal
                candidates.append(Candidate(r.request_id, len(proposal), free=True))
            elif self.draft is not None:
                candidates.append(Candidate(r.request_id, max_k, free=False))
        chosen = self.controller.choose(candidates, base_rows)
        total = 0
        for r in running:
            k = chosen.get(r.request_id, 0)
            if k == 0:
                continue
            r.num_spec_tokens = k
            if r.request_id in proposals:
                r.spec_token_ids = proposals[r.request_id][:k]
            total += k
        self.stats.last_draft_tokens = total
        self.stats.last_num_requests = base_rows

    def _host_proposal(self, request: Request, k: int) -> list[int]:
        if self.oracle is not None:
            return self.oracle.propose(request.prompt_token_ids, request.output_token_ids, k)
        if self.ngram is not None:
            return self.ngram.propose(request.all_token_ids, k, request.request_id)
        return []

    # -- after scheduling --------------------------------------------------------------------
    def fill(self, sched: SchedulerOutput) -> None:
        """Every scheduled draft row gets its token: a host proposal, else the draft model's."""
        jobs = []
        for s in sched.scheduled:
            if not s.num_draft:
                continue
            if s.request.spec_token_ids:
                s.draft_token_ids = s.request.spec_token_ids[: s.num_draft]
            else:
                jobs.append(s)
        if not jobs:
            return
        assert self.draft is not None
        t0 = time.perf_counter()
        rows0 = self.draft.num_rows
        drafts = self.draft.propose([DraftJob(s.request, s.num_draft, s.block_table) for s in jobs])
        for s, draft in zip(jobs, drafts, strict=True):
            s.draft_token_ids = draft
        self.controller.observe_draft(
            max(s.num_draft for s in jobs),
            self.draft.num_rows - rows0,
            time.perf_counter() - t0,
        )

    # -- after the step ----------------------------------------------------------------------
    def observe(
        self, sched: SchedulerOutput, sampled: dict[str, list[int]], seconds: float
    ) -> None:
        """Record the step: the target's forward pass took ``seconds``; what each request
        accepted."""
        if _decodes_only(sched):
            self.controller.observe_step(sched.num_tokens, seconds)
        assert self.stats.accepted_lengths is not None
        for s in sched.scheduled:
            if not s.num_draft:
                continue
            tokens = sampled.get(s.request.request_id)
            if not tokens:
                continue
            accepted = len(tokens) - 1
            metrics = s.request.metrics
            metrics.num_draft_tokens += s.num_draft
            metrics.num_accepted_tokens += accepted
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += s.num_draft
            self.stats.num_accepted_tokens += accepted
            self.stats.accepted_lengths[min(accepted, len(self.stats.accepted_lengths) - 1)] += 1
            self.controller.observe_request(s.request.request_id, s.num_draft, accepted)

    def observe_outcome(self, sched: SchedulerOutput, tokens: int, seconds: float) -> None:
        """The whole engine step (planning, drafts, forward pass, outputs) took ``seconds``
        and produced ``tokens``: what the controller's check against plain steps reads."""
        if _decodes_only(sched):
            drafted = any(s.num_draft for s in sched.scheduled)
            self.controller.observe_outcome(len(sched.scheduled), drafted, tokens, seconds)

    def forget(self, request_ids: Sequence[str]) -> None:
        """Requests that finished: everything known of them goes."""
        self.forget_drafts(request_ids)
        for rid in request_ids:
            self.controller.forget(rid)
            if self.ngram is not None:
                self.ngram.forget(rid)

    def forget_drafts(self, request_ids: Sequence[str]) -> None:
        """Requests whose blocks went (preempted): the draft's keys and values with them."""
        if self.draft is not None:
            self.draft.forget(request_ids)


def _decodes_only(sched: SchedulerOutput) -> bool:
    """A step of decodes (and their drafts) only: what the controller chooses for."""
    return bool(sched.scheduled) and all(
        s.start >= s.request.num_prompt_tokens for s in sched.scheduled
    )
