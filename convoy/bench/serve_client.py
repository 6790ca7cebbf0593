"""The load generator of ``convoy bench serve``: the arrival process and the requests it
sends to an OpenAI-compatible server.

Requests go to ``POST {base_url}/v1/completions`` as streams (``stream: true`` with
``stream_options.include_usage``), one per workload request, on an arrival process like
vLLM's ``benchmark_serving``: gamma-distributed gaps between sends with mean ``1 / rate`` and
shape ``burstiness`` (1 is a Poisson process), optionally capped at ``max_concurrency``
requests in flight.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from convoy.bench.serve_request import RequestRecord, error_message, send_request
from convoy.bench.workloads import BenchRequest

__all__ = [
    "COMPLETIONS_PATH",
    "ServeConfig",
    "arrival_offsets",
    "get_models",
    "run_requests",
    "warm_up",
]

COMPLETIONS_PATH = "/v1/completions"


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


async def warm_up(config: ServeConfig, prompt: str | list[int]) -> RequestRecord:
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


def get_models(base_url: str, api_key: str | None, timeout_s: float) -> list[dict[str, Any]]:
    """The ``data`` of ``GET /v1/models``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    resp = httpx.get(url, headers=headers, timeout=min(timeout_s, 30.0), trust_env=False)
    if resp.status_code != 200:
        raise ValueError(f"GET {url}: HTTP {resp.status_code}: {error_message(resp.content)}")
    data = resp.json().get("data")
    if not isinstance(data, list):
        raise ValueError(f"GET {url}: no model list in the answer")
    return [m for m in data if isinstance(m, dict)]
