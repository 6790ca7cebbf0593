"""A draft model's proposals: k greedy tokens per request, all requests together.

The draft keeps its own paged KV cache under the target's block ids, so a request's blocks
(allocation, prefix sharing, preemption, abort) cover the draft's keys and values too. What
the draft has computed of each request is tracked here: before drafting, a request catches up
on the tokens the draft has not seen (its prompt at first, the tokens the target accepted
since, the gap after steps without speculation), then the draft runs one token per round.
One call drafts for every request of the step: one catch-up forward pass for all of them,
then one pass per further draft token, with no trip through the scheduler in between.

Nothing here can change an output: a wrong key in the draft's cache (a block another request
wrote, a stale one) only makes a proposal less likely to be accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from convoy.worker.runner import ModelRunner
from convoy.worker.step import StepRequest


@dataclass
class DraftChunk:
    """A draft forward's share of one request (a :class:`~convoy.worker.step.ScheduledChunk`)."""

    request: StepRequest
    start: int
    token_ids: list[int]
    block_table: list[int]
    num_draft: int = 0
    draft_token_ids: list[int] = field(default_factory=list)
    samples: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class DraftJob:
    """Draft ``k`` tokens after ``request``'s known ones; its blocks hold every row."""

    request: StepRequest
    k: int
    block_table: list[int]


@dataclass
class _DraftState:
    """The draft's keys and values hold the request's first ``num_valid`` tokens, then
    ``pending`` (its own proposals, right only if the target accepted them)."""

    num_valid: int = 0
    pending: list[int] = field(default_factory=list)


class DraftRunner:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._state: dict[str, _DraftState] = {}
        # Tokens run through the draft model (catch-up included), for the cost model.
        self.num_rows = 0

    def forget(self, request_ids: Sequence[str]) -> None:
        """Drop what the draft knows of these requests (finished, or preempted: their blocks
        are gone)."""
        for rid in request_ids:
            self._state.pop(rid, None)

    def _valid(self, request: StepRequest) -> int:
        state = self._state.get(request.request_id)
        if state is None:
            return 0
        tokens = request.all_token_ids
        n = state.num_valid
        for token in state.pending:
            if n >= len(tokens) or tokens[n] != token:
                break
            n += 1
        # The last known token is always run: its logits give the first draft.
        return min(n, len(tokens) - 1)

    def propose(self, jobs: Sequence[DraftJob]) -> list[list[int]]:
        """``job.k`` greedy draft tokens for each job, in order."""
        drafts: list[list[int]] = [[] for _ in jobs]
        chunks = []
        for job in jobs:
            tokens = job.request.all_token_ids
            valid = self._valid(job.request)
            chunks.append(DraftChunk(job.request, valid, tokens[valid:], job.block_table))
        live = list(range(len(jobs)))
        for round_ in range(max((job.k for job in jobs), default=0)):
            self.num_rows += sum(c.num_tokens for c in chunks)
            for i, token in zip(live, self.runner.greedy_last_tokens(chunks), strict=True):
                drafts[i].append(token)
            live = [i for i in live if jobs[i].k > round_ + 1]
            chunks = [
                DraftChunk(
                    jobs[i].request,
                    len(jobs[i].request.all_token_ids) + round_,
                    [drafts[i][-1]],
                    jobs[i].block_table,
                )
                for i in live
            ]
        for job, draft in zip(jobs, drafts, strict=True):
            # Rows computed: the known tokens, then every draft but the last.
            self._state[job.request.request_id] = _DraftState(
                len(job.request.all_token_ids), draft[:-1]
            )
        return drafts
