"""``convoy bench serve``: arrival process, SSE parsing, request timing, goodput arithmetic,
and one run against a real ``convoy serve`` subprocess.

Expected values are worked out by hand in the comments, not by calling the code under test.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from convoy.bench.serve import (
    RequestRecord,
    ServeConfig,
    arrival_offsets,
    compute_serve_result,
    iter_sse_data,
    meets_slos,
    parse_chunk,
    parse_goodput,
    send_request,
)
from convoy.cli import main

# -- arrivals ----------------------------------------------------------------------------------


def _gaps(rate: float, burstiness: float, n: int = 20_000, seed: int = 7) -> np.ndarray:
    return np.diff(np.asarray(arrival_offsets(n, rate, burstiness, seed)))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_mean_gap_is_one_over_rate(burstiness: float) -> None:
    offsets = arrival_offsets(20_000, 5.0, burstiness, seed=3)
    assert len(offsets) == 20_000
    assert offsets[0] == 0.0
    assert bool(np.all(np.diff(offsets) >= 0))
    # 19,999 gaps of mean 0.2 s; the sample mean's relative error is ~ 1/sqrt(B * 20k) < 2%.
    assert float(np.mean(np.diff(offsets))) == pytest.approx(0.2, rel=0.04)


def test_burstiness_sets_the_variance() -> None:
    # Gamma(shape B, scale 1/(R B)): variance 1/(R^2 B). At R = 2: B = 1 -> 0.25,
    # B = 0.25 -> 1.0 (burstier), B = 4 -> 0.0625 (more regular).
    assert float(np.var(_gaps(2.0, 1.0))) == pytest.approx(0.25, rel=0.1)
    assert float(np.var(_gaps(2.0, 0.25))) == pytest.approx(1.0, rel=0.15)
    assert float(np.var(_gaps(2.0, 4.0))) == pytest.approx(0.0625, rel=0.1)


def test_arrivals_are_seeded_and_infinite_rate_sends_at_once() -> None:
    assert arrival_offsets(50, 3.0, 1.0, seed=1) == arrival_offsets(50, 3.0, 1.0, seed=1)
    assert arrival_offsets(50, 3.0, 1.0, seed=1) != arrival_offsets(50, 3.0, 1.0, seed=2)
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    assert arrival_offsets(0, 1.0) == []
    assert arrival_offsets(1, 1.0) == [0.0]
    for rate, burstiness in [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)]:
        with pytest.raises(ValueError):
            arrival_offsets(3, rate, burstiness)


# -- SSE parsing -------------------------------------------------------------------------------


def test_sse_decoder_events_comments_and_endings() -> None:
    raw = (
        ": ping - 2024-01-01 00:00:00\r\n"  # llama-cpp-python keep-alive comment
        "\r\n"
        'data: {"choices": [{"text": "a"}]}\r\n'
        "\r\n"
        "event: message\n"  # other fields are skipped
        "data: line one\n"
        "data:line two\n"  # the space after the colon is optional
        "\n"
        "\n"  # a blank line with no data dispatches nothing
        "data: [DONE]"  # no trailing blank line: flushed at the end
    )
    assert list(iter_sse_data(raw.splitlines())) == [
        '{"choices": [{"text": "a"}]}',
        "line one\nline two",
        "[DONE]",
    ]


def test_parse_chunk_kinds() -> None:
    text = parse_chunk('{"choices": [{"index": 0, "text": "hi", "finish_reason": null}]}')
    assert (text.text, text.usage, text.error, text.done) == ("hi", None, None, False)

    last = parse_chunk('{"choices": [{"text": "", "finish_reason": "length"}], "usage": null}')
    assert (last.text, last.finish_reason, last.usage) == ("", "length", None)

    usage = parse_chunk(
        '{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}'
    )
    assert usage.text == ""
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}

    assert text.has_choice and last.has_choice and not usage.has_choice
    assert parse_chunk("[DONE]").done
    assert parse_chunk(" [DONE] ").done

    err = parse_chunk('{"error": {"message": "boom", "type": "server_error"}}')
    assert err.error == "boom"
    assert parse_chunk('{"object": "error", "message": "bad", "code": 400}').error == "bad"
    assert parse_chunk('{"error": "plain"}').error == "plain"
    assert "malformed" in (parse_chunk("{not json").error or "")
    assert parse_chunk("[1, 2]").error is not None

    chat = parse_chunk('{"choices": [{"delta": {"content": "yo"}}]}')
    assert chat.text == "yo"


# -- one request against a scripted transport --------------------------------------------------


def _sse(*events: Any) -> list[bytes]:
    return [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]


def _text(t: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}]}


class _Body(httpx.AsyncByteStream):
    """A response body sent piece by piece, ``delay`` seconds apart."""

    def __init__(self, pieces: list[bytes], delay: float) -> None:
        self.pieces = pieces
        self.delay = delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(self.delay)
            yield piece


def _request(
    pieces: list[bytes], status: int = 200, delay: float = 0.01, timeout: float = 5.0
) -> RequestRecord:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, stream=_Body(pieces, delay))

    async def go() -> RequestRecord:
        config = ServeConfig(base_url="http://bench.test", model="m")
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(
                client, config.url, config.payload([1, 2, 3], 3), RequestRecord(0, 3, 3), timeout
            )

    record = asyncio.run(go())
    body = seen[0]
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 3
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    return record


def test_request_timing_from_chunks_and_usage() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
    rec = _request(_sse(_text("a"), _text("b"), _text("c", "length"), usage, "[DONE]"))
    assert rec.success and rec.error is None and rec.done
    assert (rec.output_tokens, rec.output_tokens_source, rec.prompt_tokens) == (3, "usage", 4)
    assert rec.num_text_chunks == 3 and len(rec.itl_s) == 2 and rec.finish_reason == "length"
    assert rec.ttft_s is not None and rec.latency_s is not None and rec.tpot_s is not None
    # Pieces 10 ms apart: the first text is the 1st piece, the stream ends after the 5th.
    assert 0 < rec.ttft_s < rec.latency_s
    assert all(x > 0 for x in rec.itl_s)
    assert rec.tpot_s == pytest.approx((rec.latency_s - rec.ttft_s) / 2)


def test_request_without_usage_counts_token_chunks() -> None:
    # llama-cpp-python's shape: one chunk per token, empty text for a token that decodes to
    # nothing, then a bare end chunk (empty text, finish reason) that is no token. Three
    # tokens; TTFT and ITL only on the two chunks with text.
    rec = _request(_sse(_text("a"), _text(""), _text("b"), _text("", "length"), "[DONE]"))
    assert rec.success and rec.finish_reason == "length"
    assert (rec.output_tokens, rec.output_tokens_source) == (3, "chunks")
    assert (rec.num_token_chunks, rec.num_text_chunks, len(rec.itl_s)) == (3, 2, 1)
    # vLLM's and convoy's shape: the last token comes with the finish reason.
    rec = _request(_sse(_text("a"), _text("b", "length"), "[DONE]"))
    assert (rec.output_tokens, rec.num_token_chunks, len(rec.itl_s)) == (2, 2, 1)


def test_request_with_no_text_succeeds_textless() -> None:
    # A random model under ignore_eos can emit nothing but EOS, which decodes to "": convoy
    # then sends one text-less final chunk. The tokens were generated; TTFT is that chunk.
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
    rec = _request(_sse(_text("", "length"), usage, "[DONE]"))
    assert rec.success and rec.textless and rec.num_text_chunks == 0
    assert (rec.output_tokens, rec.output_tokens_source, rec.itl_s) == (3, "usage", [])
    assert rec.ttft_s is not None and rec.latency_s is not None
    assert 0 < rec.ttft_s <= rec.latency_s
    result = compute_serve_result([rec], 1.0)
    assert result.num_textless == 1 and result.itl_ms is None and result.completed == 1


def test_request_failures() -> None:
    err = _request(_sse(_text("a"), {"error": {"message": "engine died"}}, "[DONE]"))
    assert not err.success and err.error == "engine died"

    http = _request([b'{"error": {"message": "prompt too long"}}'], status=400)
    assert not http.success and http.error == "HTTP 400: prompt too long"

    empty = _request(_sse({"choices": [], "usage": None}, "[DONE]"))
    assert not empty.success and empty.error == "the stream carried no completion"

    slow = _request(_sse(_text("a"), "[DONE]"), delay=1.0, timeout=0.2)
    assert not slow.success and (slow.error or "").startswith("timed out")
    assert slow.latency_s is not None and slow.latency_s < 0.9


# -- goodput arithmetic ------------------------------------------------------------------------


def _rec(
    ttft: float, latency: float, out: int, asked: int | None = None, ok: bool = True
) -> RequestRecord:
    return RequestRecord(
        index=0,
        input_len=10,
        output_len=out if asked is None else asked,
        success=ok,
        error=None if ok else "boom",
        ttft_s=ttft if ok else None,
        latency_s=latency,
        itl_s=[(latency - ttft) / (out - 1)] * (out - 1) if ok and out > 1 else [],
        output_tokens=out if ok else 0,
        output_tokens_source="usage",
    )


def test_parse_goodput() -> None:
    assert parse_goodput(None) == {}
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:2000"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2el": 2000.0,
    }
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:0"], ["ttft:-1"], ["ttft:1", "ttft:2"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_goodput_by_hand() -> None:
    records = [
        # ttft 0.1 s; tpot (1.1 - 0.1) / 10 = 0.1 s; e2el 1.1 s.
        _rec(0.1, 1.1, 11),
        # ttft 0.3 s (misses ttft:200); tpot (0.7 - 0.3) / 4 = 0.1 s; e2el 0.7 s.
        _rec(0.3, 0.7, 5),
        # ttft 0.05 s; tpot (2.05 - 0.05) / 10 = 0.2 s (misses tpot:150); got 11 of 12 asked.
        _rec(0.05, 2.05, 11, asked=12),
        # One token: no TPOT, which counts as 0 for goodput.
        _rec(0.15, 0.15, 1),
        _rec(0.0, 0.5, 4, ok=False),
    ]
    slos = {"ttft": 200.0, "tpot": 150.0}
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    assert meets_slos(records[0], {"e2el": 1100.0})  # <= meets
    assert not meets_slos(records[0], {"e2el": 1099.0})

    result = compute_serve_result(records, duration_s=4.0, slos_ms=slos)
    assert (result.num_requests, result.completed, result.failed) == (5, 4, 1)
    assert (result.num_good, result.goodput) == (2, 0.5)  # 2 good requests in 4 s
    assert result.request_throughput == 1.0  # 4 completed in 4 s
    assert result.total_input_tokens == 40  # 4 completed x 10
    assert result.total_output_tokens == 28  # 11 + 5 + 11 + 1
    assert result.output_throughput == 7.0
    assert result.total_token_throughput == 17.0
    assert (result.num_expected_output_tokens, result.num_mismatched_outputs) == (29, 1)
    assert not result.output_lengths_exact and result.output_tokens_source == "usage"
    assert result.errors == {"boom": 1}
    assert result.ttft_ms is not None and result.tpot_ms is not None
    # TTFTs 100, 300, 50, 150 ms: mean 150, median 125.
    assert result.ttft_ms.mean == pytest.approx(150.0)
    assert result.ttft_ms.median == pytest.approx(125.0)
    # TPOTs 100, 100, 200 ms (the one-token request has none).
    assert result.tpot_ms.count == 3
    assert result.tpot_ms.mean == pytest.approx(400 / 3)
    # ITLs pooled: 10 x 100 ms, 4 x 100 ms, 10 x 200 ms.
    assert result.itl_ms is not None and result.itl_ms.count == 24
    assert result.itl_ms.median == pytest.approx(100.0)
    # p90 of the 24 ITLs: rank 0.9 * 23 = 20.7, inside the 200 ms block (ranks 14..23).
    assert result.itl_ms.p90 == pytest.approx(200.0)
    table = result.format_table()
    assert "Goodput" in table and "NO (1 differ; usage)" in table

    d = result.to_dict()
    assert d["ttft_ms"]["p90"] == result.ttft_ms.p90
    assert compute_serve_result(records, 4.0).goodput is None


# -- end to end against convoy serve -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def convoy_server(make_checkpoint: Callable[..., Path], tmp_path: Path) -> Iterator[str]:
    """A ``convoy serve`` subprocess on the tiny llama checkpoint; yields its base URL."""
    model = str(make_checkpoint("llama"))
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convoy.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--num-kv-blocks",
            "256",
            "--max-model-len",
            "256",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"convoy serve exited early:\n{(tmp_path / 'server.log').read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health in 60 s:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_bench_serve_against_convoy(convoy_server: str, tmp_path: Path) -> None:
    common = [
        "bench",
        "serve",
        "--base-url",
        convoy_server,
        "--num-prompts",
        "8",
        "--input-len-min",
        "8",
        "--input-len-max",
        "32",
        "--output-len-min",
        "4",
        "--output-len-max",
        "12",
    ]
    out = tmp_path / "ids.json"
    rc = main([*common, "--goodput", "ttft:60000", "e2el:60000", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serve"
    config = report["config"]
    assert config["request_rate"] == "inf" and config["prompt_format"] == "ids"
    assert config["model"] == report["server_models"][0]["id"]  # discovered via /v1/models
    assert config["ignore_eos"] is True and config["goodput_ms"] == {"ttft": 60000, "e2el": 60000}
    result = report["result"]
    assert (result["num_requests"], result["completed"], result["failed"]) == (8, 8, 0)
    assert result["output_lengths_exact"] and result["output_tokens_source"] == "usage"
    assert result["num_good"] == 8 and result["goodput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(result[key]) == {"mean", "median", "p90", "p99", "count"}
    requests = report["requests"]
    assert len(requests) == 8
    for r in requests:
        assert r["success"] and r["output_tokens_source"] == "usage"
        assert r["output_tokens"] == r["output_len"]
        assert r["prompt_tokens"] == r["input_len"]  # ids go through unchanged
        assert 0 < r["ttft_ms"] <= r["e2el_ms"]
    assert result["total_output_tokens"] == sum(r["output_len"] for r in requests)
    assert report["workload"]["dataset"] == "random" and report["workload"]["num_requests"] == 8

    # Text prompts on a bursty, rate-limited, concurrency-capped schedule.
    out = tmp_path / "text.json"
    rc = main(
        [
            *common,
            "--prompt-format",
            "text",
            "--request-rate",
            "50",
            "--burstiness",
            "0.5",
            "--max-concurrency",
            "2",
            "--no-warmup",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["max_concurrency"] == 2
    assert report["result"]["completed"] == 8 and report["result"]["output_lengths_exact"]
    starts = sorted(r["start_ms"] for r in report["requests"])
    assert starts[-1] > 0  # spread out, not all at once
