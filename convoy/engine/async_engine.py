"""The engine loop in a thread of its own, fed and drained from asyncio.

HTTP handlers run on the event loop; ``LLMEngine.step()`` runs on the engine thread, so a
step never blocks HTTP and HTTP never blocks a step. The two meet in two places only:

* commands (add, abort) go through a thread-safe queue and are applied between steps, so
  the engine is only ever touched by its own thread;
* outputs go back to each request's ``asyncio.Queue`` with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from convoy.engine.engine import LLMEngine
from convoy.engine.request import FinishReason
from convoy.engine.spec_decode import SpecDecodeStats
from convoy.outputs import RequestOutput
from convoy.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass
class EngineStats:
    """A snapshot the engine thread publishes after every step (read by /metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Speculative decoding's totals, a copy taken on the engine thread (None: it is off).
    spec_decode: SpecDecodeStats | None = None


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


# Called on the engine thread with each output (metrics); must be quick and never raise.
OutputObserver = Callable[[RequestOutput, float], None]


class OutputStream:
    """A request's outputs, cumulative, in order; the last one has ``finished=True``.

    Whoever stops listening early (a client went away) calls :meth:`abort`.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Abort the request unless it already finished (safe to call more than once)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, observer: OutputObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[Any] | None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._wakeup = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="convoy-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ---------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> OutputStream:
        """Queue a request; iterate the returned stream for its outputs.

        Raises ``ValueError`` (and nothing is queued) if the engine refuses the request.
        """
        stream = _Stream(loop=asyncio.get_running_loop())
        await asyncio.wrap_future(
            self._submit("add", (request_id, prompt, params, cache_salt, stream))
        )
        return OutputStream(self, request_id, stream)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is unknown or finished); applied before the next step."""
        self._submit("abort", request_id, want_result=False)

    def abort_all(self) -> None:
        self._submit("abort_all", None, want_result=False)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        return await asyncio.wrap_future(self._submit("call", fn))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort everything, stop the thread and wait for it."""
        self.abort_all()
        self._stop = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _submit(self, kind: str, payload: Any, want_result: bool = True) -> Future[Any]:
        if not self._thread.is_alive():
            raise EngineDeadError("the engine thread has stopped")
        future: Future[Any] = Future()
        self._commands.put((kind, payload, future if want_result else None))
        self._wakeup.set()
        return future

    # -- engine-thread side ------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop:
            self._apply_commands()
            if not engine.has_unfinished_requests():
                self._publish_stats()
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception:  # a bug, not a bad request: fail everyone, keep serving
                logger.exception("engine step failed; failing all requests")
                self._fail_all()
                continue
            self._deliver(outputs)
            self._publish_stats()
        self._apply_commands()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = self._apply(kind, payload)
            except BaseException as e:
                if future is not None:
                    future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(result)

    def _apply(self, kind: str, payload: Any) -> Any:
        engine = self.engine
        if kind == "add":
            request_id, prompt, params, cache_salt, stream = payload
            if self._stop:
                raise EngineDeadError("the engine is shutting down")
            engine.add_request(request_id, prompt, params, cache_salt=cache_salt)
            self._streams[request_id] = stream
            return None
        if kind == "abort":
            self._deliver(engine.abort_request(payload))
            return None
        if kind == "abort_all":
            self._deliver(engine.abort_request(list(self._streams)))
            return None
        if kind == "call":
            return payload(engine)
        raise AssertionError(f"unknown command {kind}")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        for out in outputs:
            if self.observer is not None:
                self.observer(out, now)
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            # RuntimeError: the event loop is closed, so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_all(self) -> None:
        self._deliver(self.engine.end_requests(list(self._streams), FinishReason.ERROR))

    def _publish_stats(self) -> None:
        engine = self.engine
        sched = engine.scheduler
        spec = None
        if engine.speculator is not None:
            # A copy: the speculator keeps counting on this thread while /metrics reads it.
            live = engine.speculator.stats
            spec = replace(live, accepted_lengths=list(live.accepted_lengths or []))
        self.stats = EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_cache_usage=engine.kv_cache.usage,
            num_preemptions=sched.num_preemptions,
            num_prompt_tokens=engine.num_prompt_tokens,
            num_generation_tokens=engine.num_generated_tokens,
            prefix_cache_queries=engine.kv_cache.num_queried_tokens,
            prefix_cache_hits=engine.kv_cache.num_hit_tokens,
            spec_decode=spec,
        )
