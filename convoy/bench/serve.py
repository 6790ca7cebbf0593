"""``convoy bench serve``: an online load generator for any OpenAI-compatible server.

Requests go to ``POST {base_url}/v1/completions`` as streams (``stream: true`` with
``stream_options.include_usage``), one per workload request, on an arrival process like
vLLM's ``benchmark_serving``: gamma-distributed gaps between sends with mean ``1 / rate`` and
shape ``burstiness`` (1 is a Poisson process), optionally capped at ``max_concurrency``
requests in flight. Every request asks for exactly its workload's output length
(``max_tokens`` with ``ignore_eos``, greedy by default).

``ignore_eos`` is an extension (vLLM, convoy and llama.cpp's own ``llama-server`` honour it);
servers that do not know it (llama-cpp-python's server, OpenAI) ignore the field and may stop
early at EOS. The report therefore counts the tokens each request really got, from the final
usage chunk when the server sends one and otherwise by counting the streamed chunks that
carry a choice, leaving out a bare end-of-stream chunk (empty text with a finish reason).
That count is exact for a server that streams one chunk per token, empty text included for a
token that decodes to nothing (llama-cpp-python does), and a lower bound for one that merges
tokens into a chunk or skips empty ones. Any request whose count differs from what it asked
for is flagged, whichever way it differs (llama-cpp-python 0.3.36 can overrun ``max_tokens``
while its output ends in what looks like an incomplete UTF-8 character: 2495 tokens for a
request of 51 were seen).

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

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from convoy.bench.metrics import ServingStats, render_table, summarize_serving
from convoy.bench.workloads import BenchRequest, save_jsonl

__all__ = [
    "GOODPUT_METRICS",
    "RequestRecord",
    "SSEDecoder",
    "ServeResult",
    "StreamChunk",
    "arrival_offsets",
    "compute_serve_result",
    "iter_sse_data",
    "meets_slos",
    "parse_chunk",
    "parse_goodput",
    "run_serve",
    "send_request",
]

REPORT_VERSION = 1
COMPLETIONS_PATH = "/v1/completions"
# The metrics --goodput accepts, in milliseconds.
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


# -- arrivals ----------------------------------------------------------------------------------


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """When each of ``num_requests`` requests is sent, in seconds after the start.

    The first goes at 0; each gap after it is drawn from a gamma distribution with shape
    ``burstiness`` and scale ``1 / (request_rate * burstiness)``, so its mean is
    ``1 / request_rate`` and its variance ``1 / (request_rate**2 * burstiness)``. Shape 1
    makes the gaps exponential: a Poisson process. An infinite rate sends everything at 0.
    Deterministic given the arguments (numpy's PCG64 generator).
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"the request rate must be > 0, got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    return [0.0, *(float(t) for t in np.cumsum(gaps[: num_requests - 1]))]


# -- server-sent events ------------------------------------------------------------------------


class SSEDecoder:
    """Incremental Server-Sent Events decoder: feed it lines, get each event's ``data``.

    Follows the SSE format: an event ends at a blank line; its ``data:`` lines are joined with
    newlines; comment lines (``:``, which llama-cpp-python's keep-alive pings use) and the
    other fields (``event:``, ``id:``, ``retry:``) are skipped.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (its line ending optional); the event's data if it just ended."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The data of an event the stream ended without a blank line after, if any."""
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of every event in ``lines`` (a whole stream), in order."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data


@dataclass(frozen=True)
class StreamChunk:
    """One event of a completions stream, reduced to what the benchmark needs.

    ``text`` joins the text of every choice in the chunk (chat-style ``delta.content`` too);
    ``has_choice`` says the chunk carries at least one choice, text or not; ``usage`` is the
    chunk's usage object if it has one (the final chunk with ``include_usage``, whose
    ``choices`` is empty); ``error`` the message of an in-band error (or of a chunk that is
    not a JSON object); ``done`` marks ``data: [DONE]``.
    """

    text: str = ""
    usage: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False
    finish_reason: str | None = None
    has_choice: bool = False


def parse_chunk(data: str) -> StreamChunk:
    """Interpret the ``data`` of one event of a ``/v1/completions`` stream."""
    if data.strip() == "[DONE]":
        return StreamChunk(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return StreamChunk(error=f"malformed stream chunk: {data[:200]!r}")
    if not isinstance(obj, dict):
        return StreamChunk(error=f"stream chunk is not a JSON object: {data[:200]!r}")
    if obj.get("error") is not None:
        # OpenAI's (and convoy's) {"error": {"message": ...}}; some servers send a bare string.
        err = obj["error"]
        message = err.get("message") if isinstance(err, dict) else err
        return StreamChunk(error=str(message or json.dumps(err)))
    if obj.get("object") == "error":  # vLLM's ErrorResponse
        return StreamChunk(error=str(obj.get("message") or data[:200]))
    texts: list[str] = []
    finish_reason = None
    has_choice = False
    for choice in obj.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        has_choice = True
        text = choice.get("text")
        if text is None and isinstance(choice.get("delta"), dict):
            text = choice["delta"].get("content")
        if isinstance(text, str):
            texts.append(text)
        finish_reason = choice.get("finish_reason") or finish_reason
    usage = obj.get("usage")
    return StreamChunk(
        text="".join(texts),
        usage=usage if isinstance(usage, dict) else None,
        finish_reason=finish_reason,
        has_choice=has_choice,
    )


# -- one request -------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What one request saw. Times in seconds; ``start_s`` counts from the run's start.

    ``output_tokens`` comes from the usage chunk (``output_tokens_source == "usage"``) or
    else is ``num_token_chunks``, the chunks with a choice other than a bare end-of-stream
    one (``"chunks"``); ``num_text_chunks`` counts those with non-empty text, which TTFT and
    ITL are measured on. ``prompt_tokens`` is the
    server's count from the usage chunk, ``None`` without one. ``textless`` marks a
    successful request whose chunks all had empty text (every token it got decodes to
    nothing, e.g. special tokens a random model emits under ``ignore_eos``): its TTFT is then
    the arrival of its first chunk with a choice, as vLLM measures it, and it has no ITL.
    """

    index: int
    input_len: int
    output_len: int
    success: bool = False
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str = "chunks"
    prompt_tokens: int | None = None
    num_text_chunks: int = 0
    num_token_chunks: int = 0
    finish_reason: str | None = None
    done: bool = False
    textless: bool = False

    @property
    def tpot_s(self) -> float | None:
        """``(latency - ttft) / (output_tokens - 1)``; ``None`` when failed or one token."""
        if not self.success or self.ttft_s is None or self.latency_s is None:
            return None
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def num_input_tokens(self) -> int:
        """The server's prompt token count if it reported one, else the client's."""
        return self.input_len if self.prompt_tokens is None else self.prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, times in milliseconds."""

        def ms(x: float | None) -> float | None:
            return None if x is None else x * 1e3

        tpot = self.tpot_s
        return {
            "index": self.index,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "success": self.success,
            "error": self.error,
            "start_ms": self.start_s * 1e3,
            "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(tpot),
            "e2el_ms": ms(self.latency_s),
            "itl_ms": [x * 1e3 for x in self.itl_s],
            "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source,
            "prompt_tokens": self.prompt_tokens,
            "num_text_chunks": self.num_text_chunks,
            "num_token_chunks": self.num_token_chunks,
            "finish_reason": self.finish_reason,
            "done": self.done,
            "textless": self.textless,
        }


def _error_message(body: bytes, limit: int = 500) -> str:
    """The message of an error response body (OpenAI's error object or anything else),
    cut to ``limit`` characters."""
    message = _full_error_message(body.decode("utf-8", errors="replace"))
    return message if len(message) <= limit else message[:limit] + "..."


def _full_error_message(text: str) -> str:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if obj.get("message"):
            return str(obj["message"])
        if obj.get("detail"):  # FastAPI's own validation errors
            return json.dumps(obj["detail"])
    return text


class _StreamReader:
    """Applies the chunks of one stream to its :class:`RequestRecord`, timing them."""

    def __init__(self, record: RequestRecord, sent: float) -> None:
        self.record = record
        self.sent = sent
        self.last_text: float | None = None
        self.first_choice: float | None = None

    def apply(self, data: str, now: float) -> bool:
        """Take one event's data received at ``now``; ``True`` when the stream is over."""
        rec = self.record
        chunk = parse_chunk(data)
        if chunk.done:
            rec.done = True
            return True
        if chunk.error is not None:
            rec.error = chunk.error
            return True
        if chunk.usage is not None:
            completion = chunk.usage.get("completion_tokens")
            if isinstance(completion, int):
                rec.output_tokens = completion
                rec.output_tokens_source = "usage"
            prompt = chunk.usage.get("prompt_tokens")
            if isinstance(prompt, int):
                rec.prompt_tokens = prompt
        if chunk.finish_reason is not None:
            rec.finish_reason = chunk.finish_reason
        if chunk.has_choice:
            if self.first_choice is None:
                self.first_choice = now
            # A chunk with empty text and a finish reason only ends the stream.
            if chunk.text or chunk.finish_reason is None:
                rec.num_token_chunks += 1
        if chunk.text:
            rec.num_text_chunks += 1
            if self.last_text is None:
                rec.ttft_s = now - self.sent
            else:
                rec.itl_s.append(now - self.last_text)
            self.last_text = now
        return False


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str],
    reader: _StreamReader,
) -> None:
    rec = reader.record
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
            return
        decoder = SSEDecoder()
        async for line in resp.aiter_lines():
            data = decoder.feed(line)
            if data is not None and reader.apply(data, time.perf_counter()):
                return
        data = decoder.flush()
        if data is not None:
            reader.apply(data, time.perf_counter())


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: Mapping[str, Any],
    record: RequestRecord,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    run_start: float | None = None,
) -> RequestRecord:
    """Stream one completion into ``record`` and return it.

    Never raises for a failed request: the HTTP status, an in-band error chunk, a transport
    error or running past ``timeout_s`` (the whole request, end to end) become
    ``record.error`` with ``record.success`` false. A stream without a single choice fails
    too; one whose choices all have empty text succeeds, marked ``textless``.
    """
    sent = time.perf_counter()
    record.start_s = 0.0 if run_start is None else sent - run_start
    reader = _StreamReader(record, sent)
    try:
        await asyncio.wait_for(_stream(client, url, payload, headers or {}, reader), timeout_s)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout_s:g} s"
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    record.latency_s = time.perf_counter() - sent
    if record.error is None and record.num_text_chunks == 0:
        if reader.first_choice is None:
            record.error = "the stream carried no completion"
        else:
            record.textless = True
            record.ttft_s = reader.first_choice - sent
    if record.output_tokens_source == "chunks":
        record.output_tokens = record.num_token_chunks
    record.success = record.error is None
    return record


# -- aggregate ---------------------------------------------------------------------------------


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


# -- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """How a run talks to the server and schedules its requests (everything but the prompts).

    ``max_concurrency`` ``None`` is unbounded; ``extra_body`` is merged into every request.
    """

    base_url: str
    model: str
    prompt_format: str = "ids"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    request_timeout_s: float = 300.0
    temperature: float = 0.0
    goodput_ms: dict[str, float] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + COMPLETIONS_PATH

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, prompt: str | list[int], output_len: int) -> dict[str, Any]:
        """The body of one request."""
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            **self.extra_body,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, without the API key; an infinite rate is the string "inf"."""
        d = asdict(self)
        del d["api_key"]
        d["endpoint"] = COMPLETIONS_PATH
        d["ignore_eos"] = True
        if math.isinf(self.request_rate):
            d["request_rate"] = "inf"
        return d


def _client(config: ServeConfig) -> httpx.AsyncClient:
    # One connection per request in flight (unbounded without --max-concurrency), so no
    # request waits in the client's pool; trust_env off so proxy variables never intercept.
    limits = httpx.Limits(
        max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
    )
    return httpx.AsyncClient(
        timeout=httpx.Timeout(config.request_timeout_s), limits=limits, trust_env=False
    )


async def run_requests(
    config: ServeConfig,
    prompts: Sequence[str | list[int]],
    requests: Sequence[BenchRequest],
) -> tuple[list[RequestRecord], float]:
    """Send every request on the arrival process; (records in workload order, duration s)."""
    offsets = arrival_offsets(len(requests), config.request_rate, config.burstiness, config.seed)
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    async with _client(config) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(i, requests[i].input_len, requests[i].output_len)
            payload = config.payload(prompts[i], requests[i].output_len)
            timeout = config.request_timeout_s
            if slots is None:
                return await send_request(
                    client, config.url, payload, record, timeout, config.headers, start
                )
            async with slots:
                return await send_request(
                    client, config.url, payload, record, timeout, config.headers, start
                )

        records = await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - start
    return list(records), duration


async def _warm_up(config: ServeConfig, prompt: str | list[int]) -> RequestRecord:
    """One short untimed request: pays one-off costs and checks the server takes requests."""
    async with _client(config) as client:
        record = RequestRecord(-1, 0, 2)
        return await send_request(
            client,
            config.url,
            config.payload(prompt, 2),
            record,
            config.request_timeout_s,
            config.headers,
        )


def _get_models(base_url: str, api_key: str | None, timeout_s: float) -> list[dict[str, Any]]:
    """The ``data`` of ``GET /v1/models``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    resp = httpx.get(url, headers=headers, timeout=min(timeout_s, 30.0), trust_env=False)
    if resp.status_code != 200:
        raise ValueError(f"GET {url}: HTTP {resp.status_code}: {_error_message(resp.content)}")
    data = resp.json().get("data")
    if not isinstance(data, list):
        raise ValueError(f"GET {url}: no model list in the answer")
    return [m for m in data if isinstance(m, dict)]


def _tokenizer_source(tokenizer: str | None, model: str) -> str | None:
    """The tokenizer to load: ``--tokenizer``, the served model if it is a local directory,
    convoy's default model if that is what is served; ``None`` if none of these."""
    from convoy.checkpoints import DEFAULT_MODEL_NAME, default_model_path

    if tokenizer:
        return tokenizer
    if Path(model).is_dir():
        return model
    if model == DEFAULT_MODEL_NAME:
        return str(default_model_path())
    return None


def _model_vocab_size(source: str) -> int | None:
    """``vocab_size`` of the config.json beside a local tokenizer, if there is one."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("vocab_size")
    return value if isinstance(value, int) else None


def _needs_tokenizer(args: argparse.Namespace) -> bool:
    return args.dataset != "jsonl" or args.prompt_format == "text"


def _check_args(args: argparse.Namespace) -> None:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    # Validates the rate and burstiness before anything is loaded.
    arrival_offsets(0, args.request_rate, args.burstiness)


def _prompts(
    requests: Sequence[BenchRequest], prompt_format: str, tokenizer: Any | None
) -> list[str | list[int]]:
    if prompt_format == "ids":
        return [list(r.prompt_token_ids) for r in requests]
    if tokenizer is None:
        raise ValueError("--prompt-format text needs a tokenizer (--tokenizer)")
    # Special tokens (a JSONL text prompt's BOS) are left out: the server adds its own.
    return [str(tokenizer.decode(r.prompt_token_ids, skip_special_tokens=True)) for r in requests]


def run_serve(args: argparse.Namespace, name: str = "convoy bench serve") -> int:
    """Run the parsed ``convoy bench serve`` command; returns the exit status.

    0 when every request succeeded with exactly its output length; 1 when some failed or got
    another length (the table and the report are still written); 2 for bad flags, a server
    that cannot be reached, or a warm-up request that fails.
    """
    from convoy.bench.cli import workload_from_args

    try:
        _check_args(args)
        slos = parse_goodput(args.goodput)
        models = _get_models(args.base_url, args.api_key, args.request_timeout)
        model = args.model
        if model is None:
            if not models or "id" not in models[0]:
                raise ValueError(f"{args.base_url}/v1/models lists no model; pass --model")
            model = str(models[0]["id"])
        source = _tokenizer_source(args.tokenizer, model)
        tokenizer: Any | None = None
        vocab: int | None = None
        if source is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
            vocab = _model_vocab_size(source)
        elif _needs_tokenizer(args):
            raise ValueError(
                f"no tokenizer for the served model {model!r}: pass --tokenizer PATH "
                "(random prompts draw from its vocabulary; text prompts are decoded with it)"
            )
        requests, spec = workload_from_args(args, tokenizer, vocab)
        if args.save_workload is not None:
            save_jsonl(requests, args.save_workload)
            spec["saved_to"] = str(args.save_workload)
        spec["num_requests"] = len(requests)
        prompts = _prompts(requests, args.prompt_format, tokenizer)
    except (ValueError, OSError, httpx.HTTPError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2

    config = ServeConfig(
        base_url=args.base_url,
        model=model,
        prompt_format=args.prompt_format,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        request_timeout_s=args.request_timeout,
        temperature=args.temperature,
        goodput_ms=slos,
        extra_body=dict(args.extra_body or {}),
        api_key=args.api_key,
    )
    if args.warmup:
        warm = asyncio.run(_warm_up(config, prompts[0]))
        if not warm.success:
            hint = ""
            if args.prompt_format == "ids":
                hint = " (if the server takes only text prompts, try --prompt-format text)"
            print(f"{name}: the warm-up request failed: {warm.error}{hint}", file=sys.stderr)
            return 2

    records, duration = asyncio.run(run_requests(config, prompts, requests))
    result = compute_serve_result(records, duration, slos)
    print(result.format_table("Serving benchmark", config))
    for error, count in list(result.errors.items())[:5]:
        print(f"{name}: {count} request(s) failed: {error}", file=sys.stderr)

    if args.json is not None:
        report = {
            "report_version": REPORT_VERSION,
            "benchmark": "serve",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                **config.to_dict(),
                "tokenizer": source,
                "num_prompts": args.num_prompts,
                "warmup": args.warmup,
            },
            "server_models": models,
            "workload": spec,
            "client": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "httpx": httpx.__version__,
            },
            "result": result.to_dict(),
            "requests": [r.to_dict() for r in records],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)

    if result.failed:
        return 1
    if not result.output_lengths_exact:
        print(
            f"{name}: {result.num_mismatched_outputs} request(s) did not get the requested "
            "length (does the server honour ignore_eos?)",
            file=sys.stderr,
        )
        return 1
    return 0
