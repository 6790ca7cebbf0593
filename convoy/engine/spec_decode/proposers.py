"""Proposers that need no model: prompt lookup (n-gram) and the benchmarks' oracle."""

from __future__ import annotations

from collections.abc import Sequence

from convoy.model.sampler import seeded_uniform


class NgramProposer:
    """Prompt lookup: find the request's last ``n`` tokens earlier in its own tokens (prompt
    and output), longest ``n`` first, most recent occurrence first, and propose what followed
    there. Costs no forward pass, so it pays wherever it hits (code edits, quoting, RAG).

    Each request keeps an index of its n-grams (n-gram -> the position after its latest
    occurrence), extended by the tokens added since the last call: a lookup is a few dict
    reads, not a scan of the whole sequence every step.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._index: dict[str, _NgramIndex] = {}

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def propose(self, tokens: Sequence[int], k: int, request_id: str = "") -> list[int]:
        if k <= 0 or len(tokens) <= self.min_n:
            return []
        index = self._index.get(request_id)
        if index is None or index.num_indexed > len(tokens) - 1:
            index = self._index[request_id] = _NgramIndex(self.min_n, self.max_n)
        index.extend(tokens)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            follower = index.after[n - self.min_n].get(tuple(tokens[-n:]))
            if follower is not None:
                return list(tokens[follower : follower + k])
        return []


class _NgramIndex:
    """For each n: n-gram -> the position right after its latest occurrence that is followed
    by a token (so an n-gram ending at the last token is not in it yet)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.after: list[dict[tuple[int, ...], int]] = [{} for _ in range(min_n, max_n + 1)]
        self.num_indexed = 0  # n-grams ending before this position are in

    def extend(self, tokens: Sequence[int]) -> None:
        # n-grams ending at positions num_indexed .. len - 2 (each has a follower).
        for end in range(self.num_indexed, len(tokens) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self.after[n - self.min_n][tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.num_indexed = max(self.num_indexed, len(tokens) - 1)


class OracleProposer:
    """Proposes a known continuation (benchmarks), each token wrong with probability
    ``error_rate``, so that random-weight models can be measured at any acceptance while the
    target still verifies every token. References are keyed by prompt token ids."""

    def __init__(self, error_rate: float, seed: int, vocab_size: int) -> None:
        self.error_rate = error_rate
        self.seed = seed
        self.vocab_size = vocab_size
        self.references: dict[tuple[int, ...], list[int]] = {}

    def set_references(self, references: dict[tuple[int, ...], list[int]]) -> None:
        """Prompt token ids -> the output tokens the target will produce for it."""
        self.references = dict(references)

    def propose(self, prompt: Sequence[int], outputs: Sequence[int], k: int) -> list[int]:
        reference = self.references.get(tuple(prompt))
        if reference is None or k <= 0:
            return []
        n = len(outputs)
        proposal = reference[n : n + k]
        key = hash(tuple(prompt)) & 0xFFFFFFFF
        return [
            (t + 1) % self.vocab_size
            if seeded_uniform(self.seed ^ key, n + i) < self.error_rate
            else t
            for i, t in enumerate(proposal)
        ]
