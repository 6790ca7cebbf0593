"""The aggregate of a ``convoy bench serve`` run: latency statistics, throughputs, goodput.

Definitions (vLLM's):

* TTFT: from sending the request to the first chunk with non-empty text (for an output
  with no text at all, such as a random model's run of special tokens, to its first chunk
  with a choice). Time spent waiting for a ``--max-concurrency`` slot is not included; time
  queued in the server is.
* ITL: the gaps between consecutive text chunks (pooled over all requests).
* TPOT: ``(e2e_latency - ttft) / (output_tokens - 1)`` per request (none for one token).
* E2E latency: from sending the request to the end of its stream.
* Throughputs divide by the wall time from the first send until the last request ends;
  goodput is the rate of requests meeting every given SLO (a one-token request's TPOT
  counts as 0).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from convoy.bench.metrics import ServingStats, render_table, summarize_serving
from convoy.bench.serve_client import ServeConfig
from convoy.bench.serve_request import RequestRecord

__all__ = ["GOODPUT_METRICS", "ServeResult", "compute_serve_result", "meets_slos", "parse_goodput"]

# The metrics --goodput accepts, in milliseconds.
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(specs: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or ():
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput wants METRIC:MS with METRIC one of {', '.join(GOODPUT_METRICS)}, "
                f"got {spec!r}"
            )
        if name in slos:
            raise ValueError(f"--goodput gives {name} twice")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number") from None
        if not (ms > 0 and math.isfinite(ms)):
            raise ValueError(f"--goodput {spec!r}: the objective must be a positive number")
        slos[name] = ms
    return slos


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """Whether a successful request is within every objective (milliseconds; ``<=`` meets).

    A one-token request has no TPOT; it counts as 0, as in vLLM.
    """
    if not record.success or record.ttft_s is None or record.latency_s is None:
        return False
    values = {
        "ttft": record.ttft_s * 1e3,
        "tpot": (record.tpot_s or 0.0) * 1e3,
        "e2el": record.latency_s * 1e3,
    }
    return all(values[name] <= limit for name, limit in slos_ms.items())


_STAT_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@dataclass(frozen=True)
class ServeResult:
    """The outcome of a serving run. Latency statistics are in milliseconds.

    Token counts and latencies cover the successful requests only. ``num_mismatched_outputs``
    counts successful requests whose output token count differs from the one asked for;
    ``output_tokens_source`` says where the counts come from (``usage``, ``chunks`` or
    ``mixed``). ``num_textless`` counts successful requests whose output had no text (see
    :class:`RequestRecord`). ``goodput`` (requests/s) and ``num_good`` are ``None`` without
    objectives.
    """

    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    num_expected_output_tokens: int
    num_mismatched_outputs: int
    output_tokens_source: str
    num_textless: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput_slos_ms: dict[str, float]
    num_good: int | None
    goodput: float | None
    ttft_ms: ServingStats | None
    tpot_ms: ServingStats | None
    itl_ms: ServingStats | None
    e2el_ms: ServingStats | None
    errors: dict[str, int]

    @property
    def output_lengths_exact(self) -> bool:
        return self.num_mismatched_outputs == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stats as ``{"mean", "median", "p99", "count", "p90"}`` or null)."""
        d = asdict(self)
        for key in _STAT_KEYS:
            stats = getattr(self, key)
            d[key] = None if stats is None else asdict(stats)
        d["output_lengths_exact"] = self.output_lengths_exact
        return d

    def format_table(
        self, title: str = "Serving benchmark", config: ServeConfig | None = None
    ) -> str:
        """A human-readable table of the result (headed by the run's settings if given)."""
        if self.output_lengths_exact:
            exact = f"yes ({self.output_tokens_source})"
        else:
            exact = f"NO ({self.num_mismatched_outputs} differ; {self.output_tokens_source})"
        rows: list[tuple[str, str]] = []
        if config is not None:
            rate = config.request_rate
            rows += [
                ("Model", config.model),
                ("Prompt format", config.prompt_format),
                ("Request rate (req/s)", "inf" if math.isinf(rate) else f"{rate:g}"),
                ("Burstiness", f"{config.burstiness:g}"),
                ("Max concurrency", f"{config.max_concurrency or 'unbounded'}"),
            ]
        rows += [
            ("Successful requests", f"{self.completed}"),
            ("Failed requests", f"{self.failed}"),
            ("Benchmark duration (s)", f"{self.duration_s:.2f}"),
            ("Total input tokens", f"{self.total_input_tokens}"),
            ("Total output tokens", f"{self.total_output_tokens}"),
            ("Output lengths exact", exact),
        ]
        if self.num_textless:
            rows.append(("Outputs without text (TTFT = first chunk)", f"{self.num_textless}"))
        rows += [
            ("Request throughput (req/s)", f"{self.request_throughput:.2f}"),
        ]
        if self.goodput is not None:
            slos = " ".join(f"{k}:{v:g}" for k, v in self.goodput_slos_ms.items())
            rows.append((f"Goodput (req/s; {slos} ms)", f"{self.goodput:.2f}"))
        rows += [
            ("Output token throughput (tok/s)", f"{self.output_throughput:.1f}"),
            ("Total token throughput (tok/s)", f"{self.total_token_throughput:.1f}"),
            ("", f"{'mean':>9} {'median':>9} {'p90':>9} {'p99':>9}"),
            ("TTFT (ms)", _fmt(self.ttft_ms)),
            ("TPOT (ms)", _fmt(self.tpot_ms)),
            ("ITL (ms)", _fmt(self.itl_ms)),
            ("E2E latency (ms)", _fmt(self.e2el_ms)),
        ]
        return render_table(title, rows)


def _fmt(stats: ServingStats | None) -> str:
    if stats is None:
        return "n/a"
    return f"{stats.mean:9.2f} {stats.median:9.2f} {stats.p90:9.2f} {stats.p99:9.2f}"


def compute_serve_result(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos_ms: Mapping[str, float] | None = None,
) -> ServeResult:
    """Aggregate the records of a run that took ``duration_s`` seconds of wall time."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    n_in = sum(r.num_input_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    sources = {r.output_tokens_source for r in ok}
    source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "none")
    slos = dict(slos_ms or {})
    num_good = sum(meets_slos(r, slos) for r in ok) if slos else None
    tpots = [t * 1e3 for t in (r.tpot_s for r in ok) if t is not None]
    return ServeResult(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        num_expected_output_tokens=sum(r.output_len for r in ok),
        num_mismatched_outputs=sum(r.output_tokens != r.output_len for r in ok),
        output_tokens_source=source,
        num_textless=sum(r.textless for r in ok),
        request_throughput=len(ok) / duration_s,
        output_throughput=n_out / duration_s,
        total_token_throughput=(n_in + n_out) / duration_s,
        goodput_slos_ms=slos,
        num_good=num_good,
        goodput=None if num_good is None else num_good / duration_s,
        ttft_ms=summarize_serving([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
        tpot_ms=summarize_serving(tpots),
        itl_ms=summarize_serving([x * 1e3 for r in ok for x in r.itl_s]),
        e2el_ms=summarize_serving([r.latency_s * 1e3 for r in ok if r.latency_s is not None]),
        errors=dict(Counter(r.error for r in records if r.error is not None).most_common()),
    )
