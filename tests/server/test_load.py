"""Load and lifecycle: clients that go away, many clients at once, SIGTERM.

A client that disconnects has its request aborted at once: the metrics drop back to idle
(nothing running or waiting, no KV block held) within 2 s and the server's next answers are
still exactly the offline engine's.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from convoy import LLM, SamplingParams
from tests.server.conftest import (
    API_KEY,
    SERVED_NAME,
    SMALL_MODEL_LEN,
    ServerProcess,
    assert_clean_exit,
    bad_log_lines,
    get_metrics,
    start_server,
    wait_idle,
)

ABORTED = 'convoy:request_success_total{finished_reason="abort"}'
# fmt: off
WORDS = [
    "def", "class", "return", "import", "for", "while", "if", "else", "try", "with", "lambda",
    "yield", "self", "None", "True", "x", "(", ")", ":", "=", "+", "[", "]", "0", "1", "\n",
]
# fmt: on


def assert_serves_like_offline(server: ServerProcess, llm: LLM) -> None:
    prompt = "def merge(a, b):"
    r = httpx.post(
        f"{server.v1}/completions",
        json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (want,) = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert r.json()["choices"][0]["text"] == want.outputs[0].text


def sse_events(lines: list[str]) -> list[Any]:
    """The data of each SSE event: a parsed chunk, or the string '[DONE]'."""
    events: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- clients that go away ----------------------------------------------------------------------
@pytest.mark.slow
def test_dropped_streams_are_aborted(server: ServerProcess, llm: LLM) -> None:
    n_clients = 50
    before = get_metrics(server).get(ABORTED, 0.0)

    async def drop(client: httpx.AsyncClient, i: int) -> int:
        body = {
            "prompt": f"# client {i}\ndef f(x):",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        events = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    events += 1
                    if events == 3:
                        break  # leaving the block closes the connection mid-stream
        return events

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=n_clients)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:
            return list(await asyncio.gather(*(drop(c, i) for i in range(n_clients))))

    assert asyncio.run(asyncio.wait_for(run(), 60)) == [3] * n_clients
    metrics = wait_idle(server, timeout=2.0)
    assert metrics.get(ABORTED, 0.0) - before == n_clients
    assert_serves_like_offline(server, llm)
    wait_idle(server)


def test_disconnected_non_streaming_request_is_aborted(server: ServerProcess, llm: LLM) -> None:
    before = get_metrics(server).get(ABORTED, 0.0)
    body = {"prompt": "def f(x):", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/completions", json=body, timeout=httpx.Timeout(60, read=0.1))
    metrics = wait_idle(server, timeout=2.0)
    assert metrics.get(ABORTED, 0.0) - before == 1
    assert_serves_like_offline(server, llm)


def test_dropped_stream_gives_its_admission_slot_back(limited_server: ServerProcess) -> None:
    """With one request admitted at a time, a slot a dropped stream kept would block all."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "def f(x):", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=limited_server.base_url, timeout=10, headers=auth) as c:
        for _ in range(3):
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break
        wait_idle(limited_server, timeout=2.0)
        r = c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_preemption_with_dropped_streams(small_server: ServerProcess, llm: LLM) -> None:
    """More sequences than the small server's KV pool holds: the newest are preempted and
    recomputed; a quarter of the clients drop mid-stream. The others still get exactly the
    offline greedy text, and everything is released at the end."""
    n_clients = 60  # 45 of them run to the end: 45 * 4 blocks > the pool's 128
    prompts = [f"# job {i}\nx = {i}\n" for i in range(n_clients)]
    lengths = [len(llm.get_tokenizer().encode(p)) for p in prompts]
    max_tokens = SMALL_MODEL_LEN - max(lengths)
    before = get_metrics(small_server)

    async def client(c: httpx.AsyncClient, i: int) -> str | None:
        body = {
            "prompt": prompts[i],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        drop = i % 4 == 0
        text, events = "", 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    events += 1
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if drop and events == 2:
                        return None
        return text

    async def run() -> list[str | None]:
        limits = httpx.Limits(max_connections=n_clients)
        async with httpx.AsyncClient(
            base_url=small_server.base_url, timeout=60, limits=limits
        ) as c:
            return list(await asyncio.gather(*(client(c, i) for i in range(n_clients))))

    texts = asyncio.run(asyncio.wait_for(run(), 120))
    after = wait_idle(small_server, timeout=2.0)

    assert after["convoy:num_preemptions_total"] > before["convoy:num_preemptions_total"]
    dropped = sum(t is None for t in texts)
    assert after.get(ABORTED, 0.0) - before.get(ABORTED, 0.0) == dropped
    want = llm.generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        use_tqdm=False,
    )
    for i, (text, out) in enumerate(zip(texts, want, strict=True)):
        if text is not None:
            assert text == out.outputs[0].text, i


# -- many clients ------------------------------------------------------------------------------
@pytest.mark.slow
def test_200_requests_at_concurrency_32_match_offline(server: ServerProcess, llm: LLM) -> None:
    """Completions, chat and streams mixed; every one gets exactly its max_tokens and the
    greedy text the offline engine produces for it alone."""
    rng = random.Random(0)
    n_requests, concurrency = 200, 32
    jobs = []
    for i in range(n_requests):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        kind = ("completion", "chat", "completion", "stream")[i % 4]
        jobs.append((kind, text, rng.randint(1, 32)))

    async def one(client: AsyncOpenAI, gate: asyncio.Semaphore, job: tuple[str, str, int]) -> Any:
        kind, text, max_tokens = job
        common: dict[str, Any] = dict(
            model=SERVED_NAME, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        async with gate:
            if kind == "chat":
                resp = await client.chat.completions.create(
                    messages=[{"role": "user", "content": text}], **common
                )
                assert resp.usage is not None
                return resp.choices[0].message.content, resp.usage.completion_tokens
            if kind == "completion":
                resp = await client.completions.create(prompt=text, **common)
                assert resp.usage is not None
                return resp.choices[0].text, resp.usage.completion_tokens
            stream = await client.completions.create(
                prompt=text, stream=True, stream_options={"include_usage": True}, **common
            )
            pieces, usage = [], None
            async for chunk in stream:
                pieces += [c.text for c in chunk.choices]
                usage = chunk.usage or usage
            assert usage is not None
            return "".join(pieces), usage.completion_tokens

    async def run() -> list[Any]:
        gate = asyncio.Semaphore(concurrency)
        async with AsyncOpenAI(
            base_url=server.v1, api_key="unused", max_retries=0, timeout=120
        ) as client:
            return list(await asyncio.gather(*(one(client, gate, job) for job in jobs)))

    results = asyncio.run(asyncio.wait_for(run(), 150))

    assert [tokens for _, tokens in results] == [m for _, _, m in jobs]
    prompts: list[Any] = []
    for kind, text, _ in jobs:
        if kind == "chat":
            prompts.append(llm.engine.apply_chat_template([{"role": "user", "content": text}]))
        else:
            prompts.append(text)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, _, m in jobs]
    want = llm.generate(prompts, params, use_tqdm=False)
    mismatches = [
        (i, job, got, out.outputs[0].text)
        for i, (job, (got, _), out) in enumerate(zip(jobs, results, want, strict=True))
        if got != out.outputs[0].text
    ]
    assert not mismatches, mismatches[:3]
    wait_idle(server, timeout=2.0)


# -- SIGTERM -----------------------------------------------------------------------------------
@dataclass
class SigtermRun:
    long_events: list[Any]  # SSE events of a stream too long for the grace period
    short_events: list[Any]  # ... and of one that finishes within it
    events_before_signal: int
    new_request: str  # what a request on a new connection got after SIGTERM
    returncode: int
    exit_s: float  # SIGTERM to process exit
    server: ServerProcess


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[SigtermRun]:
    """A server with --shutdown-grace-s 1 gets SIGTERM while two streams are in flight."""
    log_path = tmp_path_factory.mktemp("sigterm") / "server.log"
    server = start_server(
        model_path,
        log_path,
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        "4096",
        "--num-kv-blocks",
        "300",
        "--shutdown-grace-s",
        "1",
    )
    lines: dict[str, list[str]] = {"long": [], "short": []}
    started = {"long": threading.Event(), "short": threading.Event()}

    def stream(name: str, max_tokens: int) -> None:
        body = {"prompt": "def f(x):", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", f"{server.v1}/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                lines[name].append(line)
                started[name].set()

    try:
        threads = [
            threading.Thread(target=stream, args=("long", 4000), daemon=True),
            threading.Thread(target=stream, args=("short", 100), daemon=True),
        ]
        threads[0].start()
        assert started["long"].wait(30)
        threads[1].start()
        assert started["short"].wait(30)
        events_before = len(sse_events(list(lines["long"])))
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            r = httpx.post(
                f"{server.v1}/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5
            )
            new_request = str(r.status_code)
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
        except httpx.ConnectError:
            new_request = "refused"
        for t in threads:
            t.join(30)
        returncode = server.proc.wait(15)
        exit_s = time.monotonic() - t0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
    yield SigtermRun(
        long_events=sse_events(lines["long"]),
        short_events=sse_events(lines["short"]),
        events_before_signal=events_before,
        new_request=new_request,
        returncode=returncode,
        exit_s=exit_s,
        server=server,
    )


def finish_reasons(events: list[Any]) -> list[str]:
    return [
        c["finish_reason"]
        for e in events
        if isinstance(e, dict)
        for c in e["choices"]
        if c["finish_reason"] is not None
    ]


@pytest.mark.slow
def test_sigterm_drains_then_aborts_streams(sigterm_run: SigtermRun) -> None:
    run = sigterm_run
    # The long stream kept going during the grace period, then was aborted: a final chunk
    # with finish_reason 'abort', then [DONE].
    long = run.long_events
    assert len(long) > run.events_before_signal + 1
    assert long[-1] == "[DONE]"
    assert finish_reasons(long) == ["abort"]
    assert long[-2]["choices"][0]["finish_reason"] == "abort"
    # The short one finished within the grace period.
    assert run.short_events[-1] == "[DONE]"
    assert finish_reasons(run.short_events) == ["length"]
    # New connections are refused (the listener is closed) or told to come back later.
    assert run.new_request in ("refused", "503")
    assert 0.9 < run.exit_s < 1 + 5 + 3  # grace, then uvicorn's 5 s for connections at most
    assert_clean_exit(run.server, run.returncode)
    assert not bad_log_lines(run.server.log())


@pytest.mark.slow
def test_sigterm_exits_zero(sigterm_run: SigtermRun) -> None:
    assert sigterm_run.returncode == 0
