"""Errors over raw HTTP: status codes, OpenAI error objects, the param at fault, Retry-After.

A client error is never a 500 (the autouse log check also fails a test whose requests made the
server log a traceback), and the server keeps serving after every bad request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, SERVED_NAME, ServerProcess, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"model": SERVED_NAME, "prompt": "def f(x):", "max_tokens": 2, "temperature": 0}
CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, type_: str, param: Any = ...) -> dict[str, Any]:
    """An OpenAI error object with exactly message, type, param and code."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == type_, err
    if param is not ...:
        assert err["param"] == param, err
    return dict(err)


def assert_serves(client: httpx.Client, headers: dict[str, str] | None = None) -> None:
    r = client.post("/v1/completions", json=GOOD, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


# -- 400 -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**GOOD, "temperature": -1}, "temperature"),
        ("/v1/completions", {**GOOD, "temperature": 2.5}, "temperature"),
        ("/v1/completions", {**GOOD, "top_p": 2}, "top_p"),
        ("/v1/completions", {**GOOD, "top_p": 0}, "top_p"),
        ("/v1/completions", {**GOOD, "n": 0}, "n"),
        ("/v1/completions", {**GOOD, "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {**GOOD, "max_tokens": "lots"}, "max_tokens"),
        ("/v1/completions", {**GOOD, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**GOOD, "presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {**GOOD, "top_k": -2}, "top_k"),
        ("/v1/completions", {**GOOD, "logit_bias": {"5": "much"}}, "logit_bias.5"),
        ("/v1/completions", {k: v for k, v in GOOD.items() if k != "prompt"}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": []}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": [[]]}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": [[1, 2], [-3]]}, "prompt"),
        ("/v1/completions", {**GOOD, "best_of": 3}, "best_of"),
        ("/v1/completions", {**GOOD, "suffix": "x"}, "suffix"),
        ("/v1/completions", {**GOOD, "n": 2, "echo": True, "stream": True}, "echo"),
        pytest.param("/v1/completions", {**GOOD, "prompt": 123}, "prompt"),
        pytest.param("/v1/completions", {**GOOD, "logit_bias": {"abc": 1}}, "logit_bias"),
        pytest.param("/v1/completions", {**GOOD, "stop": [""]}, "stop"),
        pytest.param("/v1/completions", {**GOOD, "min_tokens": 5}, "min_tokens"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
        ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "messages"}, "messages"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_invalid_fields_are_400(
    server: ServerProcess, http: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    assert_error(http.post(path, json=body), 400, "invalid_request_error", param)
    assert_serves(http)
    wait_idle(server)  # a request refused half-way (a bad second prompt) left nothing behind


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"prompt": "x", "max_tokens": 2'),
        pytest.param(b"not json at all"),
        b"[1, 2, 3]",
        b'"a string"',
        b"",
    ],
)
def test_malformed_bodies_are_400(http: httpx.Client, raw: bytes) -> None:
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error", None)
    assert_serves(http)


def test_prompt_longer_than_the_context(http: httpx.Client) -> None:
    prompt = "x = 1\n" * 400
    n = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert n > MAX_MODEL_LEN
    err = assert_error(
        http.post("/v1/completions", json={**GOOD, "prompt": prompt}),
        400,
        "invalid_request_error",
        "prompt",
    )
    assert str(n) in err["message"] and str(MAX_MODEL_LEN) in err["message"]

    chat = {**CHAT, "messages": [{"role": "user", "content": prompt}]}
    err = assert_error(
        http.post("/v1/chat/completions", json=chat), 400, "invalid_request_error", "messages"
    )
    assert str(MAX_MODEL_LEN) in err["message"]

    # Prompt and max_tokens together too long: both numbers in the message.
    short = "def f(x):"
    m = len(http.post("/tokenize", json={"prompt": short}).json()["tokens"])
    err = assert_error(
        http.post("/v1/completions", json={**GOOD, "prompt": short, "max_tokens": MAX_MODEL_LEN}),
        400,
        "invalid_request_error",
    )
    assert str(m) in err["message"] and str(MAX_MODEL_LEN) in err["message"]
    assert_serves(http)


@pytest.mark.engine_errors_expected
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"100000": 5.0}),
        ("logit_bias", {"-1": 5.0}),
        ("seed", 2**64),
        ("top_k", 10**20),
    ],
)
def test_values_the_model_cannot_take_are_400_and_harm_no_one_else(
    server: ServerProcess, http: httpx.Client, field: str, value: Any
) -> None:
    victim: dict[str, Any] = {}
    started = threading.Event()

    def long_stream() -> None:
        body = {**GOOD, "max_tokens": 300, "ignore_eos": True, "stream": True}
        finish = []
        with (
            httpx.Client(base_url=server.base_url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    finish += [ch["finish_reason"] for ch in json.loads(line[6:])["choices"]]
        victim["finish"] = [f for f in finish if f is not None]

    thread = threading.Thread(target=long_stream, daemon=True)
    thread.start()
    try:
        assert started.wait(30)
        r = http.post("/v1/completions", json={**GOOD, "temperature": 1.0, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field
    finally:
        thread.join(60)
    assert victim["finish"] == ["length"]


# -- 404 and 405 ---------------------------------------------------------------------------
def test_unknown_model_is_404(http: httpx.Client) -> None:
    for path, body in [
        ("/v1/completions", {**GOOD, "model": "gpt-4"}),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}),
        ("/tokenize", {"prompt": "x", "model": "gpt-4"}),
        ("/detokenize", {"tokens": [1], "model": "gpt-4"}),
    ]:
        err = assert_error(http.post(path, json=body), 404, "not_found_error", "model")
        assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
    assert_error(http.get("/v1/nothing-here"), 404, "not_found_error", None)
    assert_error(http.get("/v1/completions"), 405, "invalid_request_error", None)
    assert_serves(http)


# -- the limited server: auth, body size, admission ----------------------------------------
def test_api_key_required_except_on_public_routes(limited_server: ServerProcess) -> None:
    with httpx.Client(base_url=limited_server.base_url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            for method, path in [
                ("POST", "/v1/completions"),
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/models"),
                ("POST", "/tokenize"),
            ]:
                body = CHAT if "chat" in path else GOOD
                r = c.request(method, path, json=body, headers=headers)
                err = assert_error(r, 401, "authentication_error")
                assert err["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == SERVED_NAME
        assert_serves(c, AUTH)


def test_oversized_body_is_413(limited_server: ServerProcess) -> None:
    big = {**GOOD, "prompt": "x" * 5000}  # the limited server takes 4096-byte bodies
    with httpx.Client(base_url=limited_server.base_url, timeout=60, headers=AUTH) as c:
        assert_error(c.post("/v1/completions", json=big), 413, "invalid_request_error")
        assert_serves(c)


def test_oversized_chunked_body_is_413(limited_server: ServerProcess) -> None:
    payload = json.dumps({**GOOD, "prompt": "x" * 5000}).encode()

    def chunks() -> Iterator[bytes]:  # a generator body: no Content-Length, chunked
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    with httpx.Client(base_url=limited_server.base_url, timeout=60, headers=AUTH) as c:
        r = c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "invalid_request_error")
        assert_serves(c)


def test_full_queue_is_429_with_retry_after(limited_server: ServerProcess) -> None:
    """One request in the engine, one queued: a third one at the same time gets 429."""
    body = {**GOOD, "max_tokens": 300, "ignore_eos": True}

    async def three() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=limited_server.base_url, timeout=60, headers=AUTH
        ) as c:
            return list(
                await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(3)))
            )

    responses = asyncio.run(three())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429], [r.text[:200] for r in responses]
    (limited,) = [r for r in responses if r.status_code == 429]
    err = assert_error(limited, 429, "rate_limit_exceeded")
    assert err["code"] == "queue_full"
    assert int(limited.headers["retry-after"]) >= 1
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 300
    with httpx.Client(base_url=limited_server.base_url, timeout=60, headers=AUTH) as c:
        assert_serves(c)


def test_streams_hold_their_admission_slot(limited_server: ServerProcess) -> None:
    """While one stream runs and another waits for its slot, a third request gets 429."""
    body = {**GOOD, "max_tokens": 400, "ignore_eos": True, "stream": True}
    # The first stream must outlast the test's pauses on a fast machine: 8 samples with top
    # logprobs make ~2 MB of events, more than loopback buffers hold while nobody reads them
    # (400 plain tokens finish in a fraction of a second).
    long_body = {**body, "max_tokens": 480, "n": 8, "logprobs": 5}
    waiting: dict[str, int] = {}

    def second_stream() -> None:
        with (
            httpx.Client(base_url=limited_server.base_url, timeout=30, headers=AUTH) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            waiting["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break

    with httpx.Client(base_url=limited_server.base_url, timeout=30, headers=AUTH) as c:
        first = c.send(c.build_request("POST", "/v1/completions", json=long_body), stream=True)
        # Keep the iterator referenced: closing it (as garbage) would close the stream.
        lines = first.iter_lines()
        try:
            assert first.status_code == 200
            for line in lines:
                if line.startswith("data: {"):
                    break
            thread = threading.Thread(target=second_stream, daemon=True)
            thread.start()
            time.sleep(0.3)  # the second stream is queued behind the first by now
            third = c.post("/v1/completions", json=GOOD)
            assert_error(third, 429, "rate_limit_exceeded")
        finally:
            first.close()  # the first stream's client goes away: its slot goes to the second
            del lines
        thread.join(30)
    assert waiting["status"] == 200
    wait_idle(limited_server, timeout=2.0)
