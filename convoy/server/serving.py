"""/v1/completions and /v1/chat/completions: requests in, OpenAI-shaped responses out.

One HTTP request may carry several prompts (completions) and ``n`` samples each; every prompt
becomes one engine request, and choice ``i * n + j`` is sample ``j`` of prompt ``i``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from convoy.engine.async_engine import AsyncEngine, OutputStream
from convoy.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from convoy.sampling_params import SamplingParams
from convoy.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    error_body,
    new_id,
    now,
)

# How often a non-streaming request checks that its client is still there.
_DISCONNECT_POLL_S = 0.02


def _sampling_params(
    req: GenerationRequest,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The request's SamplingParams; a bad value is a 400 naming its field."""
    try:
        return req.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as e:
        raise APIError(str(e), param=getattr(e, "param", None)) from e


async def _releasing(
    body: AsyncIterator[str], slot: contextlib.AsyncExitStack
) -> AsyncIterator[str]:
    """``body``, then give the admission slot back (also when the client goes away)."""
    try:
        async for piece in body:
            yield piece
    finally:
        await slot.aclose()


@dataclass
class _Choice:
    """What has been sent of one choice so far (for streaming deltas)."""

    text_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0  # where the next logprobs token starts in the choice's text
    started: bool = False
    finished: bool = False


@dataclass
class _Job:
    """The engine requests behind one HTTP request."""

    streams: list[OutputStream]
    prompts: list[list[int]]
    n: int
    prompt_texts: list[str | None] = field(default_factory=list)  # as sent, for echo
    latest: list[RequestOutput | None] = field(default_factory=list)

    def abort(self) -> None:
        for s in self.streams:
            s.abort()


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        chat_template: str | None,
        admission: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.admission = admission

    # -- shared ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                status_code=404,
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def _start(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        param: str,
        cache_salt: str | None = None,
    ) -> _Job:
        job = _Job(streams=[], prompts=prompts, n=params.n)
        try:
            for i, prompt in enumerate(prompts):
                job.streams.append(
                    await self.engine.add_request(
                        f"{request_id}-{i}", prompt, params, cache_salt=cache_salt
                    )
                )
        except ValueError as e:
            job.abort()
            # The engine's "prompt" is this route's prompt field ("messages" for chat).
            field = getattr(e, "param", None)
            raise APIError(str(e), param=param if field in (None, "prompt") else field) from e
        job.latest = [None] * len(prompts)
        return job

    async def _respond(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        param: str,
        raw: Request,
        stream: Callable[[_Job], AsyncIterator[str]] | None,
        build: Callable[[_Job, list[RequestOutput]], dict[str, Any]],
        prompt_texts: list[str | None] | None = None,
        cache_salt: str | None = None,
    ) -> Response:
        """Admit, start the job, then stream it (holding the admission slot to the end) or
        collect it and build the JSON body."""
        slot = contextlib.AsyncExitStack()
        await slot.enter_async_context(self.admission())
        try:
            job = await self._start(prompts, params, request_id, param, cache_salt)
            job.prompt_texts = prompt_texts or []
            if stream is not None:
                response = StreamingResponse(
                    _releasing(stream(job), slot.pop_all()), media_type="text/event-stream"
                )
                return response  # the stream now holds the slot; ``slot`` is empty
            outputs = await self._collect(job, raw)
        finally:
            await slot.aclose()
        if outputs is None:
            # Nobody is listening; 499 is what nginx logs for "client closed request".
            return Response(status_code=499)
        return JSONResponse(build(job, outputs))

    def _base(self, request_id: str, object_type: str) -> dict[str, Any]:
        """The fields every response and chunk of one request shares."""
        return {"id": request_id, "object": object_type, "created": now(), "model": self.model_name}

    def _streamer(
        self,
        req: GenerationRequest,
        base: dict[str, Any],
        chunks: Callable[[_Job, int, RequestOutput, list[_Choice]], list[dict[str, Any]]],
    ) -> Callable[[_Job], AsyncIterator[str]]:
        """How to stream a job as SSE: ``chunks`` per output, then usage if asked for."""

        def stream(job: _Job) -> AsyncIterator[str]:
            return self._sse(
                job,
                lambda i, out, ch: chunks(job, i, out, ch),
                (lambda u: {**base, "choices": [], "usage": u}) if req.include_usage else None,
            )

        return stream

    async def _outputs(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all of a job's engine requests, interleaved as they come."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(i: int, stream: OutputStream) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
            except Exception as e:  # hand it to the consumer rather than die unseen
                await queue.put(e)
            await queue.put(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(job.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                job.latest[item[0]] = item[1]
                yield item
        finally:
            for t in tasks:
                t.cancel()
            job.abort()

    async def _collect(self, job: _Job, raw: Request) -> list[RequestOutput] | None:
        """Final outputs of a non-streaming job; None (and the job aborted) if the client
        disconnected first."""

        async def run() -> None:
            async for _ in self._outputs(job):
                pass

        async def watch() -> None:
            while not await raw.is_disconnected():
                await asyncio.sleep(_DISCONNECT_POLL_S)

        collect, watcher = asyncio.create_task(run()), asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({collect, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collect.done():
                collect.cancel()
                job.abort()
        if collect not in done:
            return None
        collect.result()
        return [out for out in job.latest if out is not None]

    def _usage(self, job: _Job) -> dict[str, Any]:
        prompt = sum(len(p) for p in job.prompts)
        outs = [out for out in job.latest if out is not None]
        completion = sum(len(c.token_ids) for out in outs for c in out.outputs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)},
        }

    async def _sse(
        self,
        job: _Job,
        chunks: Callable[[int, RequestOutput, list[_Choice]], list[dict[str, Any]]],
        usage_chunk: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> AsyncIterator[str]:
        choices = [_Choice() for _ in range(len(job.prompts) * job.n)]
        try:
            async for i, out in self._outputs(job):
                for chunk in chunks(i, out, choices):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            if usage_chunk is not None:
                yield f"data: {json.dumps(usage_chunk(self._usage(job)))}\n\n"
        except Exception as e:  # headers are gone already: report in-band, then end cleanly
            body = error_body(f"internal error while streaming: {e}", "server_error")
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    # -- /v1/completions ---------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.best_of not in (None, 1, req.n):
            raise APIError("best_of is not supported (only best_of == n)", param="best_of")
        if req.suffix:
            raise APIError("suffix is not supported", param="suffix")
        prompt_texts = self._completion_prompt_texts(req.prompt)
        tok = self.engine.engine.tokenizer
        prompts = [list(tok.encode(p)) if isinstance(p, str) else p for p in prompt_texts]
        want = req.logprobs
        params = _sampling_params(
            req, req.max_tokens, want, want if req.echo and want is not None else None
        )
        if req.echo and params.n > 1 and req.stream:
            raise APIError("echo with n > 1 is not supported when streaming", param="echo")
        request_id = new_id("cmpl")
        base = self._base(request_id, "text_completion")
        stream = self._streamer(
            req, base, lambda job, i, out, ch: self._completion_chunks(base, req, job, i, out, ch)
        )

        def build(job: _Job, outputs: list[RequestOutput]) -> dict[str, Any]:
            choices = []
            for i, out in enumerate(outputs):
                for comp in out.outputs:
                    text, logprobs = comp.text, None
                    if req.echo:
                        text = self._echo(job, i) + text
                    if want is not None:
                        logprobs, _ = self._completion_logprobs(
                            job, i, out, comp, want, with_prompt=req.echo
                        )
                    choices.append(
                        {
                            "index": i * params.n + comp.index,
                            "text": text,
                            "logprobs": logprobs,
                            "finish_reason": comp.finish_reason,
                            "stop_reason": comp.stop_reason,
                        }
                    )
            return {**base, "choices": choices, "usage": self._usage(job)}

        texts = [p if isinstance(p, str) else None for p in prompt_texts]
        return await self._respond(
            prompts,
            params,
            request_id,
            "prompt",
            raw,
            stream if req.stream else None,
            build,
            prompt_texts=texts,
            cache_salt=req.cache_salt,
        )

    @staticmethod
    def _completion_prompt_texts(prompt: Any) -> list[str | list[int]]:
        """The request's prompts, each a string or token ids."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        if all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        return [p if isinstance(p, str) else list(p) for p in prompt]

    def _echo(self, job: _Job, i: int) -> str:
        """Prompt ``i`` as the client sent it (token-id prompts decoded)."""
        text = job.prompt_texts[i] if i < len(job.prompt_texts) else None
        if text is not None:
            return text
        return str(self.engine.engine.tokenizer.decode(job.prompts[i]))

    def _completion_chunks(
        self,
        base: dict[str, Any],
        req: CompletionRequest,
        job: _Job,
        i: int,
        out: RequestOutput,
        choices: list[_Choice],
    ) -> list[dict[str, Any]]:
        chunks = []
        for comp in out.outputs:
            index = i * job.n + comp.index
            state = choices[index]
            if state.finished:
                continue
            delta = comp.text[state.text_sent :]
            if req.echo and not state.started:
                delta = self._echo(job, i) + delta
            logprobs = None
            with_prompt = req.echo and not state.started
            if req.logprobs is not None and (
                with_prompt or len(comp.token_ids) > state.tokens_sent
            ):
                logprobs, state.text_offset = self._completion_logprobs(
                    job,
                    i,
                    out,
                    comp,
                    req.logprobs,
                    state.tokens_sent,
                    with_prompt,
                    state.text_offset,
                )
            state.started = True
            state.text_sent = len(comp.text)
            state.tokens_sent = len(comp.token_ids)
            state.finished = comp.finish_reason is not None
            if not delta and not state.finished and logprobs is None:
                continue
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": index,
                            "text": delta,
                            "logprobs": logprobs,
                            "finish_reason": comp.finish_reason,
                            "stop_reason": comp.stop_reason,
                        }
                    ],
                }
            )
        return chunks

    def _completion_logprobs(
        self,
        job: _Job,
        i: int,
        out: RequestOutput,
        comp: CompletionOutput,
        k: int,
        first_token: int = 0,
        with_prompt: bool = False,
        offset: int = 0,
    ) -> tuple[dict[str, Any], int]:
        """OpenAI's completions logprobs (tokens, token_logprobs, top_logprobs, text_offset)
        for output tokens from ``first_token`` on, after the prompt's if ``with_prompt``
        (echo). Streaming calls it per chunk; returns the text offset to continue from."""
        token_ids: list[int] = []
        positions: list[PositionLogprobs | None] = []
        # Special tokens the tokenizer added to a string prompt (BOS) are not in the echoed
        # text, so they must not move the offsets.
        invisible: set[int] = set()
        if with_prompt:
            token_ids += out.prompt_token_ids
            positions += list(out.prompt_logprobs or [None] * len(out.prompt_token_ids))
            if job.prompt_texts and job.prompt_texts[i] is not None:
                invisible = set(self.engine.engine.tokenizer.all_special_ids)
        num_prompt = len(token_ids)
        token_ids += comp.token_ids[first_token:]
        positions += list(comp.logprobs or [])[first_token:]

        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for j, (tid, pos) in enumerate(zip(token_ids, positions, strict=False)):
            text = self._token_text(tid, pos)
            tokens.append(text)
            offsets.append(offset)
            if not (j < num_prompt and tid in invisible):
                offset += len(text)
            if pos is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            token_logprobs.append(pos[tid].logprob)
            top: dict[str, float] = {}
            for t, lp in sorted(pos.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]:
                # Keyed by text: two tokens may decode alike; the likelier one stays.
                top.setdefault(self._token_text(t, pos), lp.logprob)
            tops.append(top)
        block = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return block, offset

    def _token_text(self, token_id: int, pos: PositionLogprobs | None) -> str:
        if pos is not None and token_id in pos and pos[token_id].decoded_token is not None:
            return str(pos[token_id].decoded_token)
        return str(self.engine.engine.tokenizer.decode([token_id]))

    # -- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        template = req.chat_template or self.chat_template
        try:
            prompt = await self.engine.call(
                lambda e: e.apply_chat_template(messages, template, req.add_generation_prompt)
            )
        except Exception as e:  # a template that fails on these messages is the client's error
            raise APIError(f"could not apply the chat template: {e}", param="messages") from e
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = (
            req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        )
        params = _sampling_params(req, max_tokens, k)
        request_id = new_id("chatcmpl")
        base = self._base(request_id, "chat.completion.chunk")
        stream = self._streamer(
            req, base, lambda job, i, out, ch: self._chat_chunks(base, req, out, ch)
        )

        def build(job: _Job, outputs: list[RequestOutput]) -> dict[str, Any]:
            (out,) = outputs
            choices = [
                {
                    "index": comp.index,
                    "message": {"role": "assistant", "content": comp.text},
                    "logprobs": self._chat_logprobs(comp.token_ids, comp.logprobs or [], k)
                    if k is not None
                    else None,
                    "finish_reason": comp.finish_reason,
                    "stop_reason": comp.stop_reason,
                }
                for comp in out.outputs
            ]
            usage = self._usage(job)
            return {**base, "object": "chat.completion", "choices": choices, "usage": usage}

        return await self._respond(
            [prompt],
            params,
            request_id,
            "messages",
            raw,
            stream if req.stream else None,
            build,
            cache_salt=req.cache_salt,
        )

    def _chat_chunks(
        self,
        base: dict[str, Any],
        req: ChatCompletionRequest,
        out: RequestOutput,
        choices: list[_Choice],
    ) -> list[dict[str, Any]]:
        chunks = []
        k = (req.top_logprobs or 0) if req.logprobs else None
        for comp in out.outputs:
            state = choices[comp.index]
            if state.finished:
                continue
            if not state.started:
                state.started = True
                role = {"role": "assistant", "content": ""}
                chunks.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": comp.index,
                                "delta": role,
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            delta = comp.text[state.text_sent :]
            logprobs = None
            if k is not None and len(comp.token_ids) > state.tokens_sent:
                logprobs = self._chat_logprobs(
                    comp.token_ids[state.tokens_sent :],
                    (comp.logprobs or [])[state.tokens_sent :],
                    k,
                )
            state.text_sent = len(comp.text)
            state.tokens_sent = len(comp.token_ids)
            state.finished = comp.finish_reason is not None
            if not delta and not state.finished and logprobs is None:
                continue
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": comp.index,
                            "delta": {"content": delta} if delta else {},
                            "logprobs": logprobs,
                            "finish_reason": comp.finish_reason,
                            "stop_reason": comp.stop_reason,
                        }
                    ],
                }
            )
        return chunks

    def _chat_logprobs(
        self, token_ids: list[int], positions: list[PositionLogprobs], k: int
    ) -> dict[str, Any]:
        content = []
        for tid, pos in zip(token_ids, positions, strict=False):
            ranked = sorted(pos.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]
            text = self._token_text(tid, pos)
            content.append(
                {
                    "token": text,
                    "logprob": pos[tid].logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": self._token_text(t, pos),
                            "logprob": lp.logprob,
                            "bytes": list(self._token_text(t, pos).encode()),
                        }
                        for t, lp in ranked
                    ],
                }
            )
        return {"content": content}
