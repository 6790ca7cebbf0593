"""The request lifecycle: add, step, abort; detokenize; assemble outputs.

``step()`` is one iteration of continuous batching: schedule -> run the model -> update.
Every request ends exactly once (stop, length, abort or error) and gives its blocks back.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from convoy.checkpoints import default_model_path, draft_model_path
from convoy.config import EngineConfig, parse_speculative_config
from convoy.engine.detokenizer import IncrementalDetokenizer
from convoy.engine.kv_cache_manager import KVCacheManager
from convoy.engine.prefix_cache import namespace_root
from convoy.engine.profiler import StepProfiler, StepTiming
from convoy.engine.request import FinishReason, Request, RequestMetrics
from convoy.engine.scheduler import Scheduler, SchedulerOutput
from convoy.engine.spec_decode import Speculator
from convoy.engine.spec_decode.setup import find_draft, make_speculator
from convoy.model.arch import ModelArch
from convoy.model.loader import read_config, resolve_model_path
from convoy.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from convoy.sampling_params import InvalidParamError, SamplingParams
from convoy.worker.device import num_kv_blocks_for, resolve_device, resolve_dtype
from convoy.worker.runner import ModelRunner
from convoy.worker.step import ModelOutput, TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One of a parent request's ``n`` samples: its scheduler request and its text state."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0
    text_done: bool = False  # the detokenizer has flushed its held-back bytes
    # What outputs have shown so far. It only ever grows: text that a stop string may still
    # cut off is held back until the request ends.
    text: str = ""


@dataclass
class _ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    prompt_logprobs: list[PositionLogprobs | None] | None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_name = config.model.model
        if model_name is None:
            model_path = default_model_path()
        else:
            model_path = resolve_model_path(model_name, config.model.revision)
        self.model_path = model_path
        hf_config = read_config(model_path)
        self.arch = ModelArch.from_config(hf_config)
        tokenizer_path = (
            resolve_model_path(config.model.tokenizer, config.model.revision)
            if config.model.tokenizer
            else model_path
        )
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(tokenizer_path))
        self.eos_token_ids = self._eos_token_ids(model_path)

        device = resolve_device(config.model)
        dtype = resolve_dtype(config.model, device)
        config = dataclasses.replace(config, cache=config.cache.for_device(device.type))
        self.config = config
        block_size = config.cache.block_size
        assert block_size is not None  # for_device filled it in
        self.spec_config = parse_speculative_config(
            config.speculation.speculative_config,
            default_draft=str(draft_model_path()) if model_name is None else None,
        )
        draft = find_draft(self.spec_config, self.arch)
        num_blocks = num_kv_blocks_for(
            config.cache, block_size, self.arch, dtype, draft.arch if draft else None
        )
        wanted_len = config.model.max_model_len or self.arch.max_position_embeddings
        # A request must fit in the whole pool on its own, or it could never finish: cap the
        # context length by the pool (vLLM refuses to start instead; we say so and go on).
        self.max_model_len = min(wanted_len, num_blocks * block_size)
        if self.max_model_len < wanted_len:
            logger.warning(
                "max_model_len capped from %d to %d: the KV pool holds %d blocks of %d tokens",
                wanted_len,
                self.max_model_len,
                num_blocks,
                block_size,
            )
        self.kv_cache = KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        invariant = config.speculation.batch_invariant
        self.batch_invariant = invariant == "on" or (
            invariant == "auto" and self.spec_config is not None
        )
        self.runner = ModelRunner(
            config.model,
            block_size,
            self.arch,
            str(model_path),
            self.max_model_len,
            num_blocks,
            config.scheduler.max_num_seqs,
            batch_invariant=self.batch_invariant,
        )
        self.speculator: Speculator | None = None
        if self.spec_config is not None:
            self.speculator = make_speculator(
                self.spec_config,
                draft,
                config.model,
                self.arch,
                block_size,
                self.max_model_len,
                num_blocks,
                config.scheduler.max_num_seqs,
            )
        self.parents: dict[str, _ParentRequest] = {}
        self._seq_of: dict[str, tuple[_ParentRequest, _Sequence]] = {}
        self._ids = itertools.count()
        self._private_namespaces = itertools.count()
        self._decoded: dict[int, str] = {}
        # Tests (and the curious) set CONVOY_CHECK_INTEGRITY=1 to check the pool every step.
        self.check_every_step = os.environ.get("CONVOY_CHECK_INTEGRITY") == "1"
        self.num_steps = 0
        # Set to a StepProfiler to time every step's phases (convoy bench --profile).
        self.profiler: StepProfiler | None = None
        # Prompt tokens run through the model, and prompt tokens of every request that started
        # (computed or found in the prefix cache; what vLLM's prompt_tokens metric counts).
        self.num_prompt_tokens_computed = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    @property
    def backends(self) -> dict[str, str]:
        """Which implementation runs each part of the model (see ModelRunner.backends)."""
        return self.runner.backends()

    def _eos_token_ids(self, model_path: Path) -> frozenset[int]:
        """EOS ids from config.json, generation_config.json and the tokenizer, together."""
        ids: set[int] = set(self.arch.eos_token_ids)
        gen = model_path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    # -- adding and aborting -----------------------------------------------------------------
    def new_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(prompt)
        return ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of a conversation rendered with the checkpoint's (or the given) template."""
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        # The template writes the special tokens (BOS included) itself.
        ids: list[int] = self.tokenizer.encode(str(text), add_special_tokens=False)
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request; raises ``ValueError`` (and changes nothing) if it cannot be served.

        A text prompt is tokenized here unless its ``prompt_token_ids`` are given too.

        ``cache_salt`` puts the request's KV blocks in a namespace of their own: only requests
        with the same salt share cached prefixes with it (e.g. one tenant's requests).
        """
        params = params or SamplingParams()
        child_ids = (
            [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        )
        # Check every id first: a half-added request would never finish.
        for rid in {request_id, *child_ids}:
            if rid in self.parents or rid in self._seq_of:
                raise ValueError(f"request id {rid!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        if prompt_token_ids is not None:
            prompt_ids = list(prompt_token_ids)
        else:
            prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self._check_lengths(prompt_ids, params)

        metrics = RequestMetrics()
        if arrival_time is not None:
            metrics.arrival_time = arrival_time
        parent = _ParentRequest(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=prompt_ids,
            params=params,
            sequences=[],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            metrics=metrics,
        )
        if self.config.cache.enable_prefix_caching:
            cache_root = namespace_root(cache_salt)
        else:
            # A namespace of its own: the samples of this request share its prompt, nobody
            # else does.
            cache_root = namespace_root(cache_salt, f"private-{next(self._private_namespaces)}")
        for i, child_id in enumerate(child_ids):
            child_params = params
            if params.seed is not None:
                # Each sample gets its own seed, so the n samples differ but stay reproducible.
                child_params = child_params.clone(seed=params.seed + i)
            if i > 0 and params.prompt_logprobs is not None:
                # The prompt's logprobs come from the first sample; the others may then start
                # from its cached prompt instead of computing every position again.
                child_params = child_params.clone(prompt_logprobs=None)
            request = Request(
                child_id,
                prompt_ids,
                child_params,
                self.eos_token_ids,
                max_tokens,
                arrival_time=metrics.arrival_time,
                cache_root=cache_root,
                # Prompt logprobs need every prompt position computed, none skipped.
                lookup_prefix_cache=child_params.prompt_logprobs is None,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            seq = _Sequence(i, request, detok, [] if params.logprobs is not None else None)
            parent.sequences.append(seq)
        self.parents[request_id] = parent
        for seq in parent.sequences:
            self._seq_of[seq.request.request_id] = (parent, seq)
            self.scheduler.add_request(seq.request)

    def _check_lengths(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate the prompt against the model and return the resolved max_tokens."""
        if not prompt_ids:
            raise InvalidParamError("prompt", "the prompt is empty; give at least one token")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidParamError(
                "prompt", f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}"
            )
        # Checked here, not in SamplingParams, because only the model knows its vocabulary;
        # an id the sampler cannot index would fail every request of the step.
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise InvalidParamError(
                "logit_bias", f"logit_bias keys must be token ids in [0, {vocab}), got {bad[:5]}"
            )
        n = len(prompt_ids)
        if n >= self.max_model_len and not (n == self.max_model_len and params.max_tokens == 0):
            raise InvalidParamError(
                "prompt",
                f"the prompt has {n} tokens, but this model's context is {self.max_model_len} "
                f"tokens (max_model_len), which must also leave room for the output",
            )
        if params.max_tokens is None:
            return self.max_model_len - n
        if n + params.max_tokens > self.max_model_len:
            raise InvalidParamError(
                "max_tokens",
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len}); shorten the prompt or ask for fewer tokens",
            )
        return params.max_tokens

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort requests by id (unknown or finished ids are ignored); returns final outputs."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return self.end_requests(ids, FinishReason.ABORT)

    def end_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[RequestOutput]:
        """End requests now with ``reason``: their unfinished samples free their blocks.

        Unknown or finished ids are ignored. Returns the requests' final outputs.
        """
        outputs = []
        for rid in request_ids:
            parent = self.parents.get(rid)
            if parent is None:
                continue
            live = [s.request.request_id for s in parent.sequences if not s.request.is_finished]
            self.scheduler.finish_requests(live, reason)
            outputs.append(self._finish_parent(parent))
        return outputs

    def reset_prefix_cache(self) -> None:
        """Forget every cached block; only between runs (no request may be in flight)."""
        if self.parents:
            raise RuntimeError("reset_prefix_cache needs an idle engine: requests are running")
        self.kv_cache.reset_prefix_cache()

    # -- stepping ----------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.parents)

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one iteration; return outputs of requests that got new tokens or finished
        (with ``final_only``, of those that finished: callers that only collect results, like
        ``LLM.generate``, skip copying every running request's tokens and text each step)."""
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running)
        sched = self.scheduler.schedule()
        timing = None
        if self.profiler is not None:
            timing = StepTiming(
                num_decodes=sum(1 for s in sched.scheduled if s.num_tokens == 1),
                num_prefill_tokens=sum(s.num_tokens for s in sched.scheduled if s.num_tokens > 1),
                schedule=time.perf_counter() - t0,
            )
        now = time.time()
        for s in sched.scheduled:
            parent, _ = self._seq_of[s.request.request_id]
            if parent.metrics.first_scheduled_time is None:
                parent.metrics.first_scheduled_time = now
                self.num_prompt_tokens += len(parent.prompt_token_ids)
        try:
            if self.speculator is not None:
                self.speculator.forget(sched.finished_request_ids)
                self.speculator.forget_drafts([r.request_id for r in sched.preempted])
                self.speculator.fill(sched)
            t_run = time.perf_counter()
            model_out = self.runner.execute(sched, timing)
            t_ran = time.perf_counter()
        except Exception:
            # A failure inside the model must not take the engine down: the requests of this
            # step fail alone, with their blocks returned.
            logger.exception(
                "model step failed; failing the %d requests in it", len(sched.scheduled)
            )
            return self._fail_step(sched)
        self.num_steps += 1
        self.num_prompt_tokens_computed += sum(
            max(0, min(s.start + s.num_tokens, s.request.num_prompt_tokens) - s.start)
            for s in sched.scheduled
        )
        t1 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.observe(sched, model_out.sampled, t_ran - t_run)
        updated = self.scheduler.update_from_output(sched, model_out.sampled)
        num_generated = self.num_generated_tokens
        outputs = self._process(model_out, updated, final_only)
        if self.speculator is not None:
            self.speculator.observe_outcome(
                sched, self.num_generated_tokens - num_generated, time.perf_counter() - t0
            )
        if self.profiler is not None and timing is not None and not sched.is_empty:
            timing.process = time.perf_counter() - t1
            self.profiler.record(timing)
        if self.check_every_step or not self.parents:
            self.check_integrity()
        return outputs

    def _fail_step(self, sched: SchedulerOutput) -> list[RequestOutput]:
        # Blocks named when the step was scheduled were never (fully) written.
        self.kv_cache.reset_prefix_cache()
        parents = {self._seq_of[s.request.request_id][0].request_id for s in sched.scheduled}
        return self.end_requests(parents, FinishReason.ERROR)

    def _process(
        self,
        model_out: ModelOutput,
        updated: list[tuple[Request, list[int]]],
        final_only: bool = False,
    ) -> list[RequestOutput]:
        touched: dict[str, _ParentRequest] = {}
        for rid, (first, entries) in model_out.prompt_logprobs.items():
            parent, _ = self._seq_of[rid]
            self._record_prompt_logprobs(parent, first, entries)
        now = time.time()
        for request, new_tokens in updated:
            parent, seq = self._seq_of[request.request_id]
            touched[parent.request_id] = parent
            kept = self._detokenize(seq, new_tokens)
            self.num_generated_tokens += kept
            if new_tokens and parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            if seq.logprobs is not None:
                for entry in model_out.logprobs.get(request.request_id, [])[:kept]:
                    seq.logprobs.append(self._position_logprobs(entry))
                    seq.cumulative_logprob += entry.logprob
        return [self._output(p) for p in touched.values() if p.finished or not final_only]

    def _detokenize(self, seq: _Sequence, new_tokens: list[int]) -> int:
        """Take in a step's new tokens; returns how many the request keeps (fewer when a stop
        string ends it before the last)."""
        request = seq.request
        params = request.sampling_params
        text_tokens = new_tokens
        # Stop strings are matched below, so a STOP already set here came from EOS or a stop
        # token id: that token ends the sequence but is not part of its text.
        stopped_by_token = request.finish_reason is FinishReason.STOP
        if stopped_by_token and new_tokens and not params.include_stop_str_in_output:
            text_tokens = new_tokens[:-1]  # the stop token itself is not text
        before = seq.detokenizer.num_output_tokens
        matched = seq.detokenizer.update(text_tokens) if text_tokens else None
        kept = len(new_tokens)
        if matched is not None:
            # With speculation a step adds several tokens; those after the one completing
            # the stop string were never produced.
            kept = seq.detokenizer.num_output_tokens - before
            if kept < len(new_tokens):
                request.truncate_output(request.num_output_tokens - (len(new_tokens) - kept))
            if request.is_finished:
                # The same token hit max_tokens and completed a stop string: the stop wins.
                request.finish_reason, request.stop_reason = FinishReason.STOP, matched
            else:
                self.scheduler.finish_requests(
                    [request.request_id], FinishReason.STOP, stop_reason=matched
                )
        if request.is_finished:
            self._finish_text(seq)
        return kept

    def _finish_text(self, seq: _Sequence) -> None:
        if seq.text_done:
            return
        seq.detokenizer.finish()
        seq.text_done = True
        # The flushed tail (a character completed only at the end) may complete a stop string.
        matched = seq.detokenizer.matched_stop
        request = seq.request
        if matched is not None and request.stop_reason != matched:
            request.finish_reason, request.stop_reason = FinishReason.STOP, matched

    def _record_prompt_logprobs(
        self, parent: _ParentRequest, first: int, entries: list[TokenLogprobs]
    ) -> None:
        # After a preemption (or with n > 1) positions are computed again; keep the first.
        assert parent.prompt_logprobs is not None
        have = len(parent.prompt_logprobs)
        for i, entry in enumerate(entries):
            if first + i == have:
                parent.prompt_logprobs.append(self._position_logprobs(entry))
                have += 1

    def _position_logprobs(self, entry: TokenLogprobs) -> PositionLogprobs:
        result: PositionLogprobs = {
            entry.token_id: Logprob(entry.logprob, entry.rank, self._decode_one(entry.token_id))
        }
        for rank, (tid, lp) in enumerate(entry.top, start=1):
            if tid not in result:
                result[tid] = Logprob(lp, rank, self._decode_one(tid))
        return result

    def _decode_one(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id]))
            self._decoded[token_id] = text
        return text

    # -- outputs -----------------------------------------------------------------------------
    def _output(self, parent: _ParentRequest) -> RequestOutput:
        if parent.finished:
            return self._finish_parent(parent)
        return self._make_output(parent)

    def _finish_parent(self, parent: _ParentRequest) -> RequestOutput:
        """Forget a parent whose samples all ended; returns its final output."""
        for seq in parent.sequences:
            self._seq_of.pop(seq.request.request_id, None)
            self._finish_text(seq)
        self.parents.pop(parent.request_id, None)
        parent.metrics.finish_time = time.time()
        return self._make_output(parent)

    def _make_output(self, parent: _ParentRequest) -> RequestOutput:
        metrics = parent.metrics
        metrics.num_draft_tokens = sum(s.request.metrics.num_draft_tokens for s in parent.sequences)
        metrics.num_accepted_tokens = sum(
            s.request.metrics.num_accepted_tokens for s in parent.sequences
        )
        outputs = []
        for seq in parent.sequences:
            r = seq.request
            seq.text += seq.detokenizer.get_delta(finished=r.is_finished)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text,
                    token_ids=list(r.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=r.finish_reason.value if r.finish_reason else None,
                    stop_reason=r.stop_reason,
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=list(parent.prompt_logprobs) if parent.prompt_logprobs else None,
            outputs=outputs,
            finished=parent.finished,
            metrics=parent.metrics,
            # As in vLLM: what the first sample found cached when it was first scheduled.
            num_cached_tokens=parent.sequences[0].request.num_cached_tokens or 0,
        )

    # -- health ------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise if the KV pool's bookkeeping is broken; when idle, every block must be free."""
        self.scheduler.check_integrity()
        if not self.parents and self.kv_cache.pool.num_free_blocks != self.kv_cache.num_blocks:
            raise AssertionError("engine is idle but KV blocks are still in use")
