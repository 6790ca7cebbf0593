"""Benchmark arithmetic: percentiles, per-request latencies, throughput and latency results.

Pure functions over plain numbers (no engine imports), so a harness for any engine can turn
its timestamps into the same :class:`ThroughputResult` / :class:`LatencyResult` and the
numbers stay comparable.

Definitions (those of vLLM's benchmarks):

* TTFT, time to first token: ``first_token_time - arrival_time``. In an offline run every
  request arrives at the start, so it includes the time spent queued behind other requests.
* TPOT, time per output token after the first: ``(finish_time - first_token_time) /
  (num_output_tokens - 1)``; undefined for a one-token output, which is left out.
* Throughput: tokens (or requests) divided by the wall-clock time of the whole run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "LatencyResult",
    "RequestTiming",
    "ServingStats",
    "Stats",
    "ThroughputResult",
    "batch_phase_times",
    "compute_latency",
    "compute_throughput",
    "e2e_latency",
    "mean",
    "percentile",
    "render_table",
    "summarize",
    "summarize_serving",
    "tpot",
    "ttft",
]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; raises ``ValueError`` for no values."""
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as ``numpy.percentile``.

    The sorted values sit at ranks ``0 .. n-1``; the percentile is at rank ``q/100 * (n-1)``,
    interpolated linearly between the two neighbouring values.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    frac = rank - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


@dataclass(frozen=True)
class Stats:
    """Summary of a distribution (same unit as its values)."""

    mean: float
    median: float
    p99: float
    count: int


def summarize(values: Sequence[float]) -> Stats | None:
    """Mean, median and p99 of ``values``; ``None`` when there are none."""
    if not values:
        return None
    return Stats(mean(values), percentile(values, 50), percentile(values, 99), len(values))


@dataclass(frozen=True)
class ServingStats(Stats):
    """:class:`Stats` plus the 90th percentile, as online serving benchmarks report it."""

    p90: float


def summarize_serving(values: Sequence[float]) -> ServingStats | None:
    """Mean, median, p90 and p99 of ``values``; ``None`` when there are none."""
    base = summarize(values)
    if base is None:
        return None
    return ServingStats(base.mean, base.median, base.p99, base.count, percentile(values, 90))


@dataclass(frozen=True)
class RequestTiming:
    """One finished request as a benchmark sees it: wall-clock seconds and token counts."""

    arrival_time: float
    first_token_time: float
    finish_time: float
    num_input_tokens: int
    num_output_tokens: int


def ttft(t: RequestTiming) -> float:
    """Time to first token, in seconds."""
    return t.first_token_time - t.arrival_time


def tpot(t: RequestTiming) -> float | None:
    """Mean time per output token after the first, in seconds; ``None`` for one token."""
    if t.num_output_tokens < 2:
        return None
    return (t.finish_time - t.first_token_time) / (t.num_output_tokens - 1)


def e2e_latency(t: RequestTiming) -> float:
    """Arrival to finish, in seconds."""
    return t.finish_time - t.arrival_time


def _stats_dict(stats: Stats | None) -> dict[str, float | int] | None:
    return None if stats is None else asdict(stats)


def _fmt_stats(stats: Stats | None) -> str:
    if stats is None:
        return "n/a"
    return f"{stats.mean:9.2f} {stats.median:9.2f} {stats.p99:9.2f}"


@dataclass(frozen=True)
class ThroughputResult:
    """The outcome of an offline throughput run. Latency statistics are in milliseconds.

    ``num_mismatched_outputs`` counts requests whose output length differs from the one asked
    for; with EOS ignored it must be 0, or the token rates compare unequal work.
    """

    num_requests: int
    num_input_tokens: int
    num_output_tokens: int
    elapsed_s: float
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    e2e_latency_ms: Stats | None
    num_expected_output_tokens: int
    num_mismatched_outputs: int

    @property
    def output_lengths_exact(self) -> bool:
        return self.num_mismatched_outputs == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stats as ``{"mean", "median", "p99", "count"}`` or null)."""
        d = asdict(self)
        for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
            d[key] = _stats_dict(getattr(self, key))
        d["output_lengths_exact"] = self.output_lengths_exact
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThroughputResult:
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        fields = dict(d)
        fields.pop("output_lengths_exact", None)
        for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
            fields[key] = None if fields[key] is None else Stats(**fields[key])
        return cls(**fields)

    def format_table(self, title: str = "Throughput") -> str:
        """A human-readable table of the result."""
        exact = "yes" if self.output_lengths_exact else f"NO ({self.num_mismatched_outputs} differ)"
        rows = [
            ("Requests", f"{self.num_requests}"),
            ("Input tokens", f"{self.num_input_tokens}"),
            ("Output tokens", f"{self.num_output_tokens}"),
            ("Output lengths exact", exact),
            ("Elapsed (s)", f"{self.elapsed_s:.3f}"),
            ("Requests/s", f"{self.requests_per_s:.2f}"),
            ("Input tokens/s", f"{self.input_tokens_per_s:.1f}"),
            ("Output tokens/s", f"{self.output_tokens_per_s:.1f}"),
            ("Total tokens/s", f"{self.total_tokens_per_s:.1f}"),
            ("", f"{'mean':>9} {'median':>9} {'p99':>9}"),
            ("TTFT (ms)", _fmt_stats(self.ttft_ms)),
            ("TPOT (ms)", _fmt_stats(self.tpot_ms)),
            ("E2E latency (ms)", _fmt_stats(self.e2e_latency_ms)),
        ]
        return render_table(title, rows)


def render_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """Two columns, labels left and values right, under a title bar."""
    width = max(len(k) for k, _ in rows) + 2 + max(len(v) for _, v in rows)
    width = max(width, len(title) + 4)
    lines = [f" {title} ".center(width, "="), *(f"{k:<{width - len(v)}}{v}" for k, v in rows)]
    lines.append("=" * width)
    return "\n".join(lines)


def compute_throughput(
    timings: Sequence[RequestTiming],
    elapsed_s: float,
    expected_output_lens: Sequence[int] | None = None,
) -> ThroughputResult:
    """Aggregate per-request timings of a run that took ``elapsed_s`` seconds of wall time.

    ``expected_output_lens[i]`` is the output length request ``i`` asked for (default: what
    it got, i.e. no check).
    """
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s must be > 0, got {elapsed_s}")
    expected = (
        [t.num_output_tokens for t in timings]
        if expected_output_lens is None
        else list(expected_output_lens)
    )
    if len(expected) != len(timings):
        raise ValueError(f"{len(expected)} expected lengths for {len(timings)} requests")
    n_in = sum(t.num_input_tokens for t in timings)
    n_out = sum(t.num_output_tokens for t in timings)
    tpots = [x for x in (tpot(t) for t in timings) if x is not None]
    return ThroughputResult(
        num_requests=len(timings),
        num_input_tokens=n_in,
        num_output_tokens=n_out,
        elapsed_s=elapsed_s,
        requests_per_s=len(timings) / elapsed_s,
        input_tokens_per_s=n_in / elapsed_s,
        output_tokens_per_s=n_out / elapsed_s,
        total_tokens_per_s=(n_in + n_out) / elapsed_s,
        ttft_ms=summarize([ttft(t) * 1e3 for t in timings]),
        tpot_ms=summarize([x * 1e3 for x in tpots]),
        e2e_latency_ms=summarize([e2e_latency(t) * 1e3 for t in timings]),
        num_expected_output_tokens=sum(expected),
        num_mismatched_outputs=sum(
            t.num_output_tokens != e for t, e in zip(timings, expected, strict=True)
        ),
    )


def batch_phase_times(timings: Sequence[RequestTiming]) -> tuple[float, float | None, float]:
    """``(prefill_s, decode_s, total_s)`` of one batch that was submitted all at once.

    Prefill runs from the first arrival until every request has its first token (the latest
    ``first_token_time``); decode from then until the last request finishes; ``decode_s`` is
    ``None`` when the outputs are single tokens, as there is no decode phase.
    """
    if not timings:
        raise ValueError("no requests")
    start = min(t.arrival_time for t in timings)
    first = max(t.first_token_time for t in timings)
    end = max(t.finish_time for t in timings)
    decoding = any(t.num_output_tokens > 1 for t in timings)
    return first - start, (end - first if decoding else None), end - start


@dataclass(frozen=True)
class LatencyResult:
    """Per-iteration phase times of a fixed batch, and the medians over iterations.

    ``prefill_tokens_per_s = batch_size * input_len / prefill_s``; ``decode_tokens_per_s =
    batch_size * (output_len - 1) / decode_s`` (every step decodes one token per sequence,
    and the first output token comes from the prefill); ``decode_step_ms = decode_s /
    (output_len - 1)``, the time of one decode step of the whole batch.
    """

    batch_size: int
    input_len: int
    output_len: int
    prefill_s: list[float]
    decode_s: list[float] | None
    total_s: list[float]
    median_prefill_tokens_per_s: float
    median_decode_tokens_per_s: float | None
    median_decode_step_ms: float | None
    median_latency_s: float
    num_mismatched_outputs: int

    @property
    def output_lengths_exact(self) -> bool:
        return self.num_mismatched_outputs == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["num_iters"] = len(self.total_s)
        d["output_lengths_exact"] = self.output_lengths_exact
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def format_table(self, title: str = "Latency") -> str:
        """A human-readable table of the result."""

        def opt(x: float | None, fmt: str) -> str:
            return "n/a" if x is None else format(x, fmt)

        exact = "yes" if self.output_lengths_exact else f"NO ({self.num_mismatched_outputs} differ)"
        rows = [
            ("Batch size", f"{self.batch_size}"),
            ("Input / output length", f"{self.input_len} / {self.output_len}"),
            ("Iterations", f"{len(self.total_s)}"),
            ("Output lengths exact", exact),
            ("Median latency (s)", f"{self.median_latency_s:.3f}"),
            ("Median prefill (s)", f"{percentile(self.prefill_s, 50):.4f}"),
            ("Prefill tokens/s (median)", f"{self.median_prefill_tokens_per_s:.1f}"),
            ("Decode tokens/s (median)", opt(self.median_decode_tokens_per_s, ".1f")),
            ("Decode step (ms, median)", opt(self.median_decode_step_ms, ".2f")),
        ]
        return render_table(title, rows)


def compute_latency(
    iterations: Sequence[Sequence[RequestTiming]],
    batch_size: int,
    input_len: int,
    output_len: int,
) -> LatencyResult:
    """Phase times of each iteration (one batch each) and their medians; see
    :class:`LatencyResult` for the formulas."""
    if not iterations:
        raise ValueError("no iterations")
    phases = [batch_phase_times(it) for it in iterations]
    prefill = [p for p, _, _ in phases]
    total = [t for _, _, t in phases]
    decode = [d for _, d, _ in phases if d is not None]
    has_decode = output_len > 1 and len(decode) == len(phases)
    mismatched = sum(t.num_output_tokens != output_len for it in iterations for t in it)
    return LatencyResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        prefill_s=prefill,
        decode_s=decode if has_decode else None,
        total_s=total,
        median_prefill_tokens_per_s=percentile([batch_size * input_len / p for p in prefill], 50),
        median_decode_tokens_per_s=(
            percentile([batch_size * (output_len - 1) / d for d in decode], 50)
            if has_decode
            else None
        ),
        median_decode_step_ms=(
            percentile([d / (output_len - 1) * 1e3 for d in decode], 50) if has_decode else None
        ),
        median_latency_s=percentile(total, 50),
        num_mismatched_outputs=mismatched,
    )
