"""Prometheus metrics (``convoy:`` prefix, vLLM's names otherwise).

Gauges and token counters are read from the engine's published stats at scrape time;
latency histograms and finish-reason counts are fed by the engine thread as outputs appear.
The ``convoy:spec_decode_*`` series exist only while the engine speculates.
Each server gets its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from convoy.config import SpeculativeConfig
from convoy.engine.async_engine import AsyncEngine
from convoy.engine.spec_decode import SpecDecodeStats
from convoy.outputs import RequestOutput

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        yield InfoMetricFamily(
            "convoy:backend",
            "Which implementation runs each part of the model.",
            value=self.engine.engine.backends,
        )
        yield GaugeMetricFamily(
            "convoy:num_requests_running", "Sequences in the running batch.", value=s.num_running
        )
        yield GaugeMetricFamily(
            "convoy:num_requests_waiting", "Sequences waiting to be scheduled.", value=s.num_waiting
        )
        yield GaugeMetricFamily(
            "convoy:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0-1).",
            value=s.kv_cache_usage,
        )
        yield CounterMetricFamily(
            "convoy:num_preemptions",
            "Sequences preempted (recomputed later).",
            value=s.num_preemptions,
        )
        yield CounterMetricFamily(
            "convoy:prompt_tokens",
            "Prompt tokens of started requests (computed or from the prefix cache).",
            value=s.num_prompt_tokens,
        )
        yield CounterMetricFamily(
            "convoy:generation_tokens", "Tokens generated.", value=s.num_generation_tokens
        )
        yield CounterMetricFamily(
            "convoy:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            value=s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "convoy:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed).",
            value=s.prefix_cache_hits,
        )
        spec_config = self.engine.engine.spec_config
        if spec_config is not None:
            yield _spec_info(spec_config)
            if s.spec_decode is not None:
                yield from _spec_decode_metrics(s.spec_decode)


def _spec_info(config: SpeculativeConfig) -> Metric:
    return InfoMetricFamily(
        "convoy:spec_decode",
        "Speculative decoding's configuration.",
        value={
            "method": str(config.method),
            "num_speculative_tokens": str(config.num_speculative_tokens),
            "draft_model": config.model or "",
            "adaptive": str(config.adaptive).lower(),
        },
    )


def _spec_decode_metrics(st: SpecDecodeStats) -> Iterator[Metric]:
    # CounterMetricFamily appends the "_total" the exposed names end in.
    yield CounterMetricFamily(
        "convoy:spec_decode_num_drafts",
        "Verify steps of one request with at least one proposed token.",
        value=st.num_drafts,
    )
    yield CounterMetricFamily(
        "convoy:spec_decode_num_draft_tokens",
        "Proposed tokens verified by the target.",
        value=st.num_draft_tokens,
    )
    yield CounterMetricFamily(
        "convoy:spec_decode_num_accepted_tokens",
        "Proposed tokens the target accepted.",
        value=st.num_accepted_tokens,
    )
    # accepted_lengths[a] counts the verifies that accepted a tokens: bucket le=a holds those
    # that accepted at most a.
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for accepted, count in enumerate(st.accepted_lengths or []):
        cumulative += count
        buckets.append((str(float(accepted)), cumulative))
    buckets.append(("+Inf", cumulative))  # every verify: num_drafts
    yield HistogramMetricFamily(
        "convoy:spec_decode_acceptance_length",
        "Proposed tokens accepted per verify step of one request.",
        buckets=buckets,
        sum_value=st.num_accepted_tokens,
    )
    yield GaugeMetricFamily(
        "convoy:spec_decode_draft_length",
        "Mean draft length chosen per decoding request in the latest step.",
        value=st.last_draft_tokens / max(1, st.last_num_requests),
    )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_success = Counter(
            "convoy:request_success",
            "Finished sequences by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "convoy:time_to_first_token_seconds",
            "Arrival to first output token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "convoy:inter_token_latency_seconds",
            "Time between a request's output tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "convoy:e2e_request_latency_seconds",
            "Arrival to finish.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "convoy:request_queue_time_seconds",
            "Arrival to first scheduled.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # request id -> (time of its last output, tokens it had then); engine thread only.
        self._last: dict[str, tuple[float, int]] = {}

    def attach(self, engine: AsyncEngine) -> None:
        self.registry.register(_EngineCollector(engine))

    def observe(self, out: RequestOutput, now: float) -> None:
        """Record one output (called on the engine thread)."""
        tokens = sum(len(c.token_ids) for c in out.outputs)
        last = self._last.get(out.request_id)
        m = out.metrics
        if last is None:
            if tokens and m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
        elif tokens > last[1]:
            gap = (now - last[0]) / (tokens - last[1])
            for _ in range(tokens - last[1]):
                self.itl.observe(gap)
        if tokens:
            self._last[out.request_id] = (now, tokens)
        if out.finished:
            self._last.pop(out.request_id, None)
            for c in out.outputs:
                self.request_success.labels(c.finish_reason or "unknown").inc()
            self.e2e.observe(now - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue_time.observe(m.first_scheduled_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
