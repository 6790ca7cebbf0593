"""How many tokens each request drafts this step: the most accepted tokens per second.

Speculation trades rows for steps. A step of ``R`` rows costs about ``a + b R`` seconds (the
fixed part is reading the weights, the launch and Python overhead; ``b`` is what each row
adds once the batch is compute-bound), plus the draft model's ``e0`` per round and ``e1`` per
row. A request that accepts its depth-i draft token with probability ``alpha_i`` (given the
ones before were accepted) gains ``alpha_0 ... alpha_j`` expected tokens from its
``j+1``-th draft row. Starting from no drafts, the
controller keeps adding the row of highest expected gain while that raises the step's
tokens per second, that is while ``gain / added seconds`` beats the step's average. A single
stream on a bandwidth-bound CPU (``b`` small) drafts the most; a large compute-bound batch
(``b R`` far above ``a``) drafts nothing, so speculation never makes a crowd slower.

Both costs are fitted online from the steps the engine times (least squares with
forgetting), and each request's ``alpha`` from its own recent acceptances. Only steps without
prompt rows count (the ones the choice is about), and never the first step of a given size (a
new shape may compile a kernel first). A line needs steps of different sizes: one step in
``PROBE_EVERY`` does the opposite of the plan (no drafts when drafting, one draft each when
not), which keeps both ends of the line measured as the load changes.

The model can be wrong (costs it does not see: the draft's catch-up, the host's work per
token). So the controller also keeps, per load (decoding requests, in powers of two), the
tokens per second that steps with drafts and steps without actually reached, the latter
from the probes; where steps without drafts did better, it stops drafting at that load, and
its probes then try the model's plan again.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

PROBE_EVERY = 32


class LinearCost:
    """seconds ~ intercept + slope * x, least squares over recent observations (each step
    weighs ``decay`` times the one after), the slope shrunk toward 0 while x barely varies."""

    def __init__(self, decay: float = 0.99, ridge: float = 1.0, skip: str = "size") -> None:
        self.decay = decay
        self.ridge = ridge
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        # What to leave out, as possibly paying for compiling a kernel: the first observation
        # of each (integer) size, or ("warmup") the first few observations.
        self.skip = skip
        self._seen: set[float] = set()
        self._count = 0

    def add(self, x: float, y: float) -> None:
        self._count += 1
        if self.skip == "size" and x not in self._seen:
            self._seen.add(x)
            return
        if self.skip == "warmup" and self._count <= 3:
            return
        d = self.decay
        self.n = self.n * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y

    @property
    def known(self) -> bool:
        return self.n > 0.0

    @property
    def slope(self) -> float:
        if self.n == 0.0:
            return 0.0
        var = self.sxx - self.sx * self.sx / self.n
        cov = self.sxy - self.sx * self.sy / self.n
        return max(0.0, cov / (var + self.ridge))

    @property
    def intercept(self) -> float:
        if self.n == 0.0:
            return 0.0
        return max(0.0, (self.sy - self.slope * self.sx) / self.n)


class Acceptance:
    """Acceptance at each draft depth: ``alpha(j)`` estimates the chance that the draft token
    at depth j is accepted given that those before it were, from decayed counts. Depths differ
    (an n-gram match that holds for one token tends to hold for the next), so each has its own
    count; a depth with no record yet takes the estimate of the one before it.

    ``prior``: the estimate a new request starts from and is pulled toward while its own
    record is short (the engine-wide one, over every request); ``weight`` how many
    observations it is worth.
    """

    def __init__(self, prior: Acceptance | None = None, weight: float = 2.0) -> None:
        self.prior = prior
        self.weight = weight
        self.taken: list[float] = []
        self.refused: list[float] = []

    def alpha(self, depth: int) -> float:
        base = self.prior.alpha(depth) if self.prior is not None else 0.7
        if depth >= len(self.taken):
            if self.prior is None and depth > 0:
                return self.alpha(depth - 1)
            taken = refused = 0.0
        else:
            taken, refused = self.taken[depth], self.refused[depth]
        if self.prior is None and depth < len(self.taken) and taken + refused > 0:
            return taken / (taken + refused)
        return (taken + self.weight * base) / (taken + refused + self.weight)

    def add(self, num_draft: int, num_accepted: int, decay: float = 0.8) -> None:
        while len(self.taken) < num_draft:
            self.taken.append(0.0)
            self.refused.append(0.0)
        # Depths 0 .. accepted - 1 were taken; the first refused one (if any) was seen too.
        for j in range(min(num_draft, num_accepted + 1)):
            self.taken[j] *= decay
            self.refused[j] *= decay
            if j < num_accepted:
                self.taken[j] += 1.0
            else:
                self.refused[j] += 1.0


class _Outcomes:
    """Decayed tokens/s of steps with drafts ([0]) and without ([1]) at one load, and how
    many of each were seen: a side is trusted after MIN_OUTCOMES (one slow step, a kernel
    compiled on first use, must not turn speculation off)."""

    MIN_OUTCOMES = 3

    def __init__(self) -> None:
        self.rate = [0.0, 0.0]
        self.count = [0, 0]

    def add(self, drafted: bool, rate: float, decay: float) -> None:
        i = 0 if drafted else 1
        self.rate[i] = rate if self.count[i] == 0 else decay * self.rate[i] + (1 - decay) * rate
        self.count[i] += 1

    def plain_wins(self) -> bool:
        return min(self.count) >= self.MIN_OUTCOMES and self.rate[1] > self.rate[0]


def _bucket(base_rows: int) -> int:
    return max(1, base_rows).bit_length()


@dataclass
class Candidate:
    """A request that may draft: up to ``max_k`` tokens, ``free`` when its proposal needs no
    draft model (an n-gram hit)."""

    request_id: str
    max_k: int
    free: bool


class DraftLengthController:
    def __init__(self, adaptive: bool) -> None:
        self.adaptive = adaptive
        self.target = LinearCost()
        # Seconds of one draft round ~ its rows (catch-up included). Sizes vary every call, so
        # only the first calls are left out.
        self.draft_rounds = LinearCost(skip="warmup")
        self.acceptance: dict[str, Acceptance] = {}
        # Every request's verifies together: where a new request's estimate starts.
        self.overall = Acceptance()
        self._steps = 0
        # Load bucket -> tokens/s of steps with drafts and without.
        self._outcomes: dict[int, _Outcomes] = {}

    # -- learning ----------------------------------------------------------------------------
    def observe_step(self, rows: int, seconds: float) -> None:
        """A step of ``rows`` output rows (decodes and drafts) and no prompt rows."""
        self.target.add(rows, seconds)

    def observe_outcome(
        self, base_rows: int, drafted: bool, tokens: int, seconds: float, decay: float = 0.8
    ) -> None:
        """What a decode step produced: ``tokens`` in ``seconds`` (draft work included)."""
        if seconds <= 0:
            return
        outcome = self._outcomes.setdefault(_bucket(base_rows), _Outcomes())
        outcome.add(drafted, tokens / seconds, decay)

    def _drafting_loses(self, base_rows: int) -> bool:
        outcome = self._outcomes.get(_bucket(base_rows))
        return outcome is not None and outcome.plain_wins()

    def observe_draft(self, rounds: int, rows: int, seconds: float) -> None:
        """A draft call: ``rounds`` forward passes over ``rows`` rows in all."""
        if rounds <= 0:
            return
        per_round = seconds / rounds
        self.draft_rounds.add(rows / rounds, per_round)

    def observe_request(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        if num_draft > 0:
            acc = self.acceptance.setdefault(request_id, Acceptance(self.overall))
            acc.add(num_draft, num_accepted)
            self.overall.add(num_draft, num_accepted, decay=0.98)

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)

    def alpha(self, request_id: str, depth: int = 0) -> float:
        acc = self.acceptance.get(request_id)
        return acc.alpha(depth) if acc is not None else self.overall.alpha(depth)

    # -- choosing ----------------------------------------------------------------------------
    def choose(self, candidates: list[Candidate], base_rows: int) -> dict[str, int]:
        """Each candidate's draft length for a step of ``base_rows`` rows without drafts."""
        if not self.adaptive:
            return {c.request_id: c.max_k for c in candidates}
        if not self.target.known:
            # Nothing measured yet: free proposals in full, which also gives the cost model
            # steps of different sizes to learn from; the draft model waits for the figures.
            return {c.request_id: c.max_k if c.free else 0 for c in candidates}
        chosen = self._best(candidates, base_rows)
        self._steps += 1
        probe = bool(candidates) and self._steps % PROBE_EVERY == 0
        if self._drafting_loses(base_rows):
            # Measured: no drafts did better here. Probes retry the plan.
            return chosen if probe else {c.request_id: 0 for c in candidates}
        if probe:
            drafting = any(chosen.values())
            return {c.request_id: 0 if drafting else 1 for c in candidates}
        return chosen

    def _best(self, candidates: list[Candidate], base_rows: int) -> dict[str, int]:
        b = self.target.slope
        tokens = float(base_rows)
        seconds = self.target.intercept + b * base_rows
        e0 = self.draft_rounds.intercept
        e1 = self.draft_rounds.slope
        k = {c.request_id: 0 for c in candidates}
        rounds = 0
        heap = [(-self.alpha(c.request_id), i) for i, c in enumerate(candidates) if c.max_k > 0]
        heapq.heapify(heap)
        while heap:
            neg_gain, i = heapq.heappop(heap)
            c = candidates[i]
            gain = -neg_gain
            j = k[c.request_id]
            added = b
            if not c.free:
                added += e1 + (e0 if j + 1 > rounds else 0.0)
            if seconds > 0 and gain * seconds <= tokens * added:
                # The best row left would lower tokens per second; every other row gains less.
                # (A row needing a new draft round costs more than one that does not; the
                # rounds are paid once by the batch, so that order is close enough.)
                if not c.free and j + 1 > rounds:
                    continue
                break
            k[c.request_id] = j + 1
            tokens += gain
            seconds += added
            if not c.free:
                rounds = max(rounds, j + 1)
            if j + 1 < c.max_k:
                heapq.heappush(heap, (-(gain * self.alpha(c.request_id, j + 1)), i))
        return k
