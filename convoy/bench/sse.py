"""Server-Sent Events as an OpenAI-compatible ``/v1/completions`` stream sends them: an
incremental decoder of the events' ``data`` and the reading of one event's chunk."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["SSEDecoder", "StreamChunk", "iter_sse_data", "parse_chunk"]


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
