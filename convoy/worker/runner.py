"""The model runner: one step is prepare -> run -> sample. No policy lives here.

- **prepare** (:mod:`convoy.worker.input_batch`): the scheduled rows flattened into token
  ids, positions and the attention backend's metadata;
- **run**: the model's forward pass (the backend may replay a captured one), giving the
  final hidden state of every row, or of the sampled rows only;
- **sample**: greedy rows through the head's screen where there is one, the rest through
  the full vocabulary projection and the sampler; then the logprobs asked for.

Where the next capabilities hook in: speculative tokens are more query rows of a request in
*prepare* and more sampled rows to verify in *sample*; a grammar's token mask applies to the
logits in :meth:`ModelRunner._sample_full` before the sampler; adapters and tensor-parallel
linears are a :class:`~convoy.model.ops.ModelOps` choice made in ``__init__``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch

from convoy.config import ModelConfig
from convoy.model import cpu_kernels
from convoy.model.arch import ModelArch
from convoy.model.attention import CudaGraphAttention
from convoy.model.attention.cuda import DecodeGraphs
from convoy.model.greedy_head import ScreenedGreedyHead, make_greedy_head
from convoy.model.host_allocator import keep_step_buffers_on_heap
from convoy.model.loader import load_model
from convoy.model.sampler import (
    Sampler,
    SamplingRow,
    TopLogprobs,
    gather_logprobs,
    needs_history,
    plain_greedy,
)
from convoy.worker.device import resolve_device, resolve_dtype
from convoy.worker.input_batch import StepInputs, prepare_inputs
from convoy.worker.model_ops import choose_model_ops, greedy_screen_kernels
from convoy.worker.step import (
    ModelOutput,
    PhaseTimes,
    ScheduledChunk,
    StepPlan,
    StepRequest,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)


def _top_list(top: TopLogprobs, i: int) -> list[tuple[int, float]]:
    return list(zip(top.top_ids[i].tolist(), top.top_logprobs[i].tolist(), strict=True))


def _token_logprobs(top: TopLogprobs, i: int, token: int, n_top: int) -> TokenLogprobs:
    return TokenLogprobs(
        token_id=token,
        logprob=float(top.sampled_logprobs[i]),
        rank=int(top.sampled_ranks[i]),
        top=_top_list(top, i)[:n_top],
    )


def num_accepted(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """How many leading drafts equal the target's own tokens at their rows."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


def _sampling_row(request: StepRequest, drafts: Sequence[int], i: int) -> SamplingRow:
    """The sampler's view of the row sampling output ``len(outputs) + i`` of ``request``,
    with its first ``i`` drafts taken as given."""
    params = request.sampling_params
    outputs: Sequence[int] = request.output_token_ids
    if i and needs_history(params):
        outputs = [*outputs, *drafts[:i]]
    return SamplingRow(
        params=params,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=outputs,
        eos_token_ids=request.eos_token_ids,
        draw_index=len(request.output_token_ids) + i,
    )


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        block_size: int,
        arch: ModelArch,
        model_path: str,
        max_model_len: int,
        num_blocks: int,
        max_num_seqs: int,
        batch_invariant: bool = False,
    ) -> None:
        self.device = resolve_device(model_config)
        self.dtype = resolve_dtype(model_config, self.device)
        self.arch = arch
        self.block_size = block_size
        self.max_model_len = max_model_len
        # Padded positions read this slot, past every block's (see AttentionBackend).
        self.pad_slot = num_blocks * block_size
        self.ops = choose_model_ops(
            model_config,
            arch,
            self.device,
            self.dtype,
            block_size,
            self.pad_slot,
            max_num_seqs,
            max_model_len,
            batch_invariant,
        )
        screen = greedy_screen_kernels(model_config, self.ops.linear)
        self.model = load_model(
            Path(model_path),
            arch,
            max_model_len,
            self.device,
            self.dtype,
            self.ops,
            keep_plain_head=screen is not None,
        )
        # Greedy rows' tokens from a bfloat16 and/or int8 screen of the head (float32 CPU
        # models, CPUs with native bfloat16 or VNNI), which reads the plain head weight.
        self.greedy_head: ScreenedGreedyHead | None = None
        if screen is not None:
            self.greedy_head = make_greedy_head(self.model.lm_head.weight, screen)
        # One tensor for the whole cache: (layers, 2, slots + extra, kv_heads, head_dim).
        # torch.empty only reserves address space; pages become resident as blocks are first
        # written. The pad slot is zeroed: unwritten memory may hold NaN.
        extra_slots = self.ops.attention.extra_kv_slots
        self.kv_cache = torch.empty(
            (arch.num_layers, 2, self.pad_slot + extra_slots, arch.num_kv_heads, arch.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_cache[:, :, self.pad_slot].zero_()
        self.kv_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(arch.num_layers)
        ]
        self.sampler = Sampler(arch.vocab_size, self.device, model_config.seed, self.ops.kernels)
        if self.device.type == "cpu":
            # After the weights and the cache are allocated: they stay mapped on their own.
            keep_step_buffers_on_heap()
        logger.info("backends: %s", self.backends())

    def backends(self) -> dict[str, str]:
        """Which implementation runs each part of the model (startup log, /metrics), and
        why convoy's CPU kernels are not in use where they could be."""
        names = self.ops.describe()
        names["greedy_screen"] = type(self.greedy_head).__name__ if self.greedy_head else "none"
        reason = cpu_kernels.unavailable_reason()
        if reason is not None:
            names["cpu_kernels_unavailable"] = reason.splitlines()[0][:200]
        return names

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        attention = self.ops.attention
        return attention.graphs if isinstance(attention, CudaGraphAttention) else None

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan, timing: PhaseTimes | None = None) -> ModelOutput:
        """Run one scheduled step; ``timing``, when given, gets its phases' seconds."""
        t0 = time.perf_counter()
        result = ModelOutput()
        if plan.is_empty:
            return result
        inputs = prepare_inputs(plan.scheduled, self.ops.attention, self.block_size, self.device)
        t1 = time.perf_counter()
        hidden = self._run(inputs)
        t2 = time.perf_counter()
        t3 = self._sample(inputs, hidden, result)
        self._prompt_logprobs(inputs, hidden, result)
        if timing is not None:
            timing.prepare, timing.forward = t1 - t0, t2 - t1
            timing.logits, timing.sample = t3 - t2, time.perf_counter() - t3
        return result

    @torch.inference_mode()
    def greedy_last_tokens(self, chunks: Sequence[ScheduledChunk]) -> list[int]:
        """Run the chunks and return the argmax of each one's last row, in the chunks' order
        (a draft model's proposals)."""
        inputs = prepare_inputs(chunks, self.ops.attention, self.block_size, self.device)
        hidden = self._run(inputs)
        rows = [inputs.row(j, s.start + s.num_tokens - 1) for j, s in enumerate(inputs.order)]
        last = self._hidden_of(inputs, hidden, rows)
        tokens: list[int | None] = [None] * len(rows)
        if self.greedy_head is not None:
            tokens = [t if t >= 0 else None for t in self.greedy_head(last).tolist()]
        rest = [i for i, t in enumerate(tokens) if t is None]
        if rest:
            logits = self.model.compute_logits(last[rest] if len(rest) < len(rows) else last)
            for i, t in zip(rest, logits.argmax(dim=-1).tolist(), strict=True):
                tokens[i] = t
        by_chunk = {id(s): t for s, t in zip(inputs.order, tokens, strict=True)}
        return [cast(int, by_chunk[id(c)]) for c in chunks]

    def _run(self, inputs: StepInputs) -> torch.Tensor:
        """(T, C) final hidden states, or (N, C): the sampled rows only, in order
        (``meta.output_rows``)."""
        return self.ops.attention.run_model(
            lambda ids, pos, meta: self.model(ids, pos, self.kv_caches, meta),
            inputs.input_ids,
            inputs.positions,
            inputs.meta,
        )

    def _hidden_of(self, inputs: StepInputs, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The final hidden states of flat ``rows`` of the step (``hidden`` holds every row,
        or only ``inputs.computed_rows``)."""
        if inputs.computed_rows is not None:
            at_row = {r: i for i, r in enumerate(inputs.computed_rows)}
            rows = [at_row[r] for r in rows]
        if rows == list(range(hidden.shape[0])):
            return hidden  # usually: every row is wanted, in order
        return hidden.index_select(0, torch.tensor(rows, device=self.device))

    def _sample(self, inputs: StepInputs, hidden: torch.Tensor, result: ModelOutput) -> float:
        """New tokens for every chunk that samples, into ``result``; returns when the logits
        were done (for the step's timing).

        A chunk with drafts samples a token at each of its last ``1 + num_draft`` rows, each
        row as if the drafts before it were already the request's (penalties see them, a
        seeded row draws at its own output index). The request keeps the target's tokens up
        to and including the first that differs from the draft: exactly the tokens it would
        have sampled one step at a time.
        """
        jobs = [(s, inputs.sampled_rows(j)) for j, s in enumerate(inputs.order) if s.samples]
        if not jobs:
            return time.perf_counter()
        last_hidden = self._hidden_of(inputs, hidden, [r for _, rows in jobs for r in rows])
        rows = [
            _sampling_row(s.request, s.draft_token_ids, i)
            for s, chunk_rows in jobs
            for i in range(len(chunk_rows))
        ]
        tokens = self._screen_greedy(last_hidden, rows)
        # The rest (sampled rows, logprobs, penalties; rows the screen left): full logits.
        rest = [k for k, token in enumerate(tokens) if token is None]
        top, t_logits = self._sample_full(last_hidden, rows, rest, tokens)
        at = {k: i for i, k in enumerate(rest)}
        k = 0
        for s, chunk_rows in jobs:
            targets = cast(list[int], tokens[k : k + len(chunk_rows)])
            kept = targets[: num_accepted(s.draft_token_ids, targets) + 1]
            rid = s.request.request_id
            result.sampled[rid] = kept
            n_top = s.request.sampling_params.logprobs
            if top is not None and n_top is not None:
                # Rows asking for logprobs are never screened.
                result.logprobs[rid] = [
                    _token_logprobs(top, at[k + i], token, n_top) for i, token in enumerate(kept)
                ]
            k += len(chunk_rows)
        return t_logits

    def _screen_greedy(self, hidden: torch.Tensor, rows: list[SamplingRow]) -> list[int | None]:
        """Tokens of the plain greedy rows the head's screen settles; ``None`` for the rest."""
        tokens: list[int | None] = [None] * len(rows)
        if self.greedy_head is None:
            return tokens
        screened = [k for k, r in enumerate(rows) if plain_greedy(r)]
        if not screened:
            return tokens
        # Usually every row: then no gathered copy (a list index is a slow torch path).
        screened_hidden = hidden if len(screened) == len(rows) else hidden[screened]
        for k, token in zip(screened, self.greedy_head(screened_hidden).tolist(), strict=True):
            tokens[k] = token if token >= 0 else None
        return tokens

    def _sample_full(
        self,
        hidden: torch.Tensor,
        rows: list[SamplingRow],
        rest: list[int],
        tokens: list[int | None],
    ) -> tuple[TopLogprobs | None, float]:
        """Rows ``rest`` through the full vocabulary projection and the sampler, their tokens
        into ``tokens``; returns their logprobs (if any row asked) and when the logits were
        done."""
        if not rest:
            return None, time.perf_counter()
        rest_hidden = hidden if len(rest) == len(rows) else hidden[rest]
        logits = self.model.compute_logits(rest_hidden)  # (len(rest), V)
        t_logits = time.perf_counter()
        rest_tokens, top = self.sampler(logits, [rows[k] for k in rest])
        for k, token in zip(rest, rest_tokens, strict=True):
            tokens[k] = token
        return top, t_logits

    def _prompt_logprobs(
        self, inputs: StepInputs, hidden: torch.Tensor, result: ModelOutput
    ) -> None:
        """Logprobs of prompt tokens predicted within each chunk: position p scores token
        p+1."""
        for s, q_start in zip(inputs.order, inputs.prompt_base, strict=True):
            request = s.request
            k = request.sampling_params.prompt_logprobs
            if k is None:
                continue
            # Exclusive, in positions.
            last = min(s.start + s.num_tokens, request.num_prompt_tokens - 1)
            if last <= s.start:
                continue
            rows = hidden[q_start : q_start + (last - s.start)]
            logprobs = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
            targets = torch.tensor(
                request.prompt_token_ids[s.start + 1 : last + 1], device=self.device
            )
            top = gather_logprobs(logprobs, targets, k)
            entries = [
                TokenLogprobs(
                    token_id=int(t), logprob=float(lp), rank=int(rk), top=_top_list(top, i)
                )
                for i, (t, lp, rk) in enumerate(
                    zip(
                        targets.tolist(),
                        top.sampled_logprobs.tolist(),
                        top.sampled_ranks.tolist(),
                        strict=True,
                    )
                )
            ]
            result.prompt_logprobs[request.request_id] = (s.start + 1, entries)
