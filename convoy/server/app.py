"""The FastAPI application: routes, errors as OpenAI error objects, auth, admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convoy.config import ServerConfig
from convoy.engine.async_engine import AsyncEngine, EngineDeadError
from convoy.server.metrics import ServerMetrics
from convoy.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from convoy.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

# Names pydantic puts in an error's loc for the member of a union that failed.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}

# Routes anyone may call even with --api-key (load balancers and scrapers).
_PUBLIC_PATHS = {"/health", "/metrics", "/docs", "/openapi.json"}


class Admission:
    """At most ``max_concurrent`` requests in the engine; up to ``max_queued`` more wait.

    Beyond that a request gets 429 at once, and while the server drains (SIGTERM) 503: both
    with Retry-After, so well-behaved clients back off instead of piling up.
    """

    def __init__(self, max_concurrent: int | None, max_queued: int | None) -> None:
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self.num_queued = 0
        self.draining = threading.Event()

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        if self.draining.is_set():
            raise APIError(
                "the server is shutting down",
                503,
                "service_unavailable",
                headers={"Retry-After": "5"},
            )
        if self._slots is None:
            yield
            return
        full = self.max_queued is not None and self.num_queued >= self.max_queued
        if self._slots.locked() and full:
            raise APIError(
                "too many requests are queued; retry later",
                429,
                "rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.num_queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.num_queued -= 1
        try:
            yield
        finally:
            self._slots.release()


class BodySizeLimit:
    """413 for bodies over the limit, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_too_large(send, self.max_bytes)
            return
        # Read the body here, up to the limit: a chunked body declares no length, and an
        # error raised from inside the framework's body parsing would come out as a 400.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await _send_too_large(send, self.max_bytes)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class ApiKeyAuth:
    """401 unless ``Authorization: Bearer KEY``, except on the public paths.

    Plain ASGI rather than ``@app.middleware``: that wrapper gets in the way of streaming
    responses and of noticing client disconnects.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in _PUBLIC_PATHS
            and dict(scope.get("headers", [])).get(b"authorization") != self.expected
        ):
            body = JSONResponse(
                error_body(
                    "invalid or missing API key",
                    "authentication_error",
                    code="invalid_api_key",
                ),
                401,
            )
            await send({"type": "http.response.start", "status": 401, "headers": body.raw_headers})
            await send({"type": "http.response.body", "body": body.body})
            return
        await self.app(scope, receive, send)


async def _send_too_large(send: Send, limit: int) -> None:
    body = JSONResponse(
        error_body(f"request body exceeds {limit} bytes", "invalid_request_error"), 413
    )
    await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


def build_app(engine: AsyncEngine, config: ServerConfig, model_name: str) -> FastAPI:
    """The server's ASGI app around an already running :class:`AsyncEngine`."""
    metrics = ServerMetrics()
    metrics.attach(engine)
    engine.observer = metrics.observe
    admission = Admission(config.max_concurrent_requests, config.max_queued_requests)
    chat_template = _read_template(config.chat_template)
    serving = OpenAIServing(engine, model_name, chat_template, admission)

    app = FastAPI(title="convoy", version="0.1.0")
    app.state.engine = engine
    app.state.admission = admission
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return JSONResponse(
            error_body(str(e), "service_unavailable"), 503, headers={"Retry-After": "5"}
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        # pydantic's loc goes on into union members ("prompt.str", "prompt.list[int]"), which
        # are not fields; for broken JSON it ends in a character offset.
        loc: list[str] = []
        for part in first.get("loc", ()):
            if part == "body":
                continue
            if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
                break
            loc.append(str(part))
        if first.get("type") == "json_invalid":
            loc = []
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
            f"{err.get('msg')}"
            for err in errors[:5]
        )
        return JSONResponse(
            error_body(
                message or "invalid request", "invalid_request_error", param=".".join(loc) or None
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.get("/health")
    async def health() -> Any:
        if not engine.is_alive:
            return JSONResponse(error_body("engine is not running", "server_error"), 503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Any:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "convoy",
                    "max_model_len": engine.engine.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        return await serving.chat(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Any:
        serving.check_model(req.model)
        e = engine.engine
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            try:
                tokens = await engine.call(
                    lambda eng: eng.apply_chat_template(
                        messages, chat_template, req.add_generation_prompt
                    )
                )
            except Exception as err:
                raise APIError(
                    f"could not apply the chat template: {err}", param="messages"
                ) from err
        else:
            tokens = list(e.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": e.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Any:
        serving.check_model(req.model)
        vocab = engine.engine.arch.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": engine.engine.tokenizer.decode(req.tokens)}

    return app


def _read_template(value: str | None) -> str | None:
    """``--chat-template`` is either the template itself or a file holding it."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text()
    return value
