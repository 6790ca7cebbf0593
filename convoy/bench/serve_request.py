"""One streamed ``/v1/completions`` request of ``convoy bench serve``, timed chunk by chunk.

Every request asks for exactly its workload's output length (``max_tokens`` with
``ignore_eos``, greedy by default). ``ignore_eos`` is an extension (vLLM, convoy and
llama.cpp's own ``llama-server`` honour it); servers that do not know it (llama-cpp-python's
server, OpenAI) ignore the field and may stop early at EOS. A request therefore counts the
tokens it really got, from the final usage chunk when the server sends one and otherwise by
counting the streamed chunks that carry a choice, leaving out a bare end-of-stream chunk
(empty text with a finish reason). That count is exact for a server that streams one chunk
per token, empty text included for a token that decodes to nothing (llama-cpp-python does),
and a lower bound for one that merges tokens into a chunk or skips empty ones. Any request
whose count differs from what it asked for is flagged, whichever way it differs
(llama-cpp-python 0.3.36 can overrun ``max_tokens`` while its output ends in what looks like
an incomplete UTF-8 character).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from convoy.bench.sse import SSEDecoder, parse_chunk

__all__ = ["RequestRecord", "error_message", "send_request"]


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


def error_message(body: bytes, limit: int = 500) -> str:
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
            rec.error = f"HTTP {resp.status_code}: {error_message(await resp.aread())}"
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
