"""One timed run, one table cell (an engine configuration on a workload), and the plain
arithmetic on them (unit-tested in tests/bench/test_compare.py)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from convoy.bench.workloads import BenchRequest


def median_or_none(values: Sequence[float]) -> float | None:
    """Median of ``values``, ``None`` when there are none."""
    return statistics.median(values) if values else None


def ratio(convoy_tps: float | None, peer_tps: float | None) -> float | None:
    """convoy / peer output tokens/s; ``None`` when either is missing or the peer is 0."""
    if convoy_tps is None or not peer_tps:
        return None
    return convoy_tps / peer_tps


def fraction_of_bound(bound_s: float, elapsed_s: float) -> float:
    """Share of the roofline an engine reaches: bound time over measured time (same work)."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s must be > 0, got {elapsed_s}")
    return bound_s / elapsed_s


@dataclass
class Run:
    """One timed run: output tokens produced and wall time, and the run's roofline bound at
    the machine's peaks measured just before it (``None`` when they were not measured)."""

    elapsed_s: float
    num_output_tokens: int
    bound_s: float | None = None
    peaks: dict[str, float] | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s


@dataclass
class Cell:
    """All runs of one engine configuration on one workload, or why it did not run."""

    workload: str
    engine: str
    config: str
    concurrency: int | None = None
    runs: list[Run] = field(default_factory=list)
    bound_s: float | None = None
    not_run: str | None = None

    @property
    def median_tps(self) -> float | None:
        return median_or_none([r.output_tokens_per_s for r in self.runs])

    @property
    def median_elapsed_s(self) -> float | None:
        return median_or_none([r.elapsed_s for r in self.runs])

    @property
    def pct_of_bound(self) -> float | None:
        """Median over runs of each run's bound (at the peaks measured just before it) over
        its time; without per-run peaks, ``bound_s`` (start-of-run peaks) over the median
        time."""
        if self.runs and all(r.bound_s is not None for r in self.runs):
            return median_or_none(
                [100 * fraction_of_bound(r.bound_s, r.elapsed_s) for r in self.runs if r.bound_s]
            )
        return self.pct_of_start_bound

    @property
    def pct_of_start_bound(self) -> float | None:
        """``bound_s`` (the machine's peaks measured once, at the start) over the median time."""
        el = self.median_elapsed_s
        if self.bound_s is None or el is None:
            return None
        return 100 * fraction_of_bound(self.bound_s, el)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            median_output_tokens_per_s=self.median_tps,
            median_elapsed_s=self.median_elapsed_s,
            pct_of_bound=self.pct_of_bound,
            pct_of_start_bound=self.pct_of_start_bound,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        """The cell :meth:`to_dict` saved (its derived medians are recomputed, not read)."""
        runs = [
            Run(r["elapsed_s"], r["num_output_tokens"], r.get("bound_s"), r.get("peaks"))
            for r in d["runs"]
        ]
        return cls(
            d["workload"],
            d["engine"],
            d["config"],
            d["concurrency"],
            runs,
            d["bound_s"],
            d["not_run"],
        )


class EngineError(RuntimeError):
    """An engine failed a run; the message goes in the table."""


def check_lengths(lens: Sequence[int], requests: Sequence[BenchRequest]) -> None:
    """Raise :class:`EngineError` unless every output has exactly its requested length."""
    bad = sum(n != r.output_len for n, r in zip(lens, requests, strict=True))
    if len(lens) != len(requests) or bad:
        raise EngineError(f"{bad} of {len(requests)} outputs had the wrong length")
