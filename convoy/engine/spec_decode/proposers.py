"""Proposers that need no model: prompt lookup (n-gram) and the benchmarks' oracle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convoy.model.sampler import seeded_uniform


class NgramProposer:
    """Prompt lookup: find the request's last ``n`` tokens earlier in its own tokens (prompt
    and output), longest ``n`` first, most recent occurrence first, and propose what followed
    there. Costs no forward pass, so it pays wherever it hits (code edits, quoting, RAG)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(tokens) <= self.min_n:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            suffix = arr[-n:]
            # Windows ending before the suffix itself; the match must leave a token after it.
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist()
        return []


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
