"""Flatten a scheduled step into the model's inputs: token ids, positions, slots, and the
attention backend's metadata.

Python touches each request once (its new token ids, its block table); everything per token
is computed with tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from convoy.model.attention import AttentionBackend, AttentionBatch, AttentionMetadata
from convoy.worker.step import ScheduledChunk


@dataclass
class Span:
    """Query rows that attention treats as one sequence: a prompt chunk's rows, or a single
    output row (a decode, a recomputed output, a proposed token)."""

    chunk: int  # index of its chunk in the step's order
    start: int  # position of its first query
    tokens: Sequence[int]
    block_table: list[int]


@dataclass
class StepInputs:
    """A step's rows in attention order and the tensors the model reads."""

    order: list[ScheduledChunk]
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    batch: AttentionBatch
    meta: AttentionMetadata[Any, Any]
    # Flat row of each chunk's first output row and of its first prompt row (-1: none).
    output_base: list[int]
    prompt_base: list[int]
    # The rows the last layer computes (meta.output_rows), on the host; None: every row.
    computed_rows: list[int] | None = None

    def row(self, j: int, position: int) -> int:
        """The flat row of chunk ``j``'s query at ``position``."""
        s = self.order[j]
        first_output = max(s.start, s.request.num_prompt_tokens)
        if position >= first_output:
            return self.output_base[j] + position - first_output
        return self.prompt_base[j] + position - s.start

    def sampled_rows(self, j: int) -> list[int]:
        """Rows of chunk ``j`` whose logits give a token: its last, and one per draft."""
        s = self.order[j]
        last = s.start + s.num_tokens - 1
        return [self.row(j, p) for p in range(last - s.num_draft, last + 1)]


def num_prompt_rows(s: ScheduledChunk) -> int:
    """How many of the chunk's queries sit at prompt positions."""
    return max(0, min(s.start + s.num_tokens, s.request.num_prompt_tokens) - s.start)


def order_for_attention(scheduled: Sequence[ScheduledChunk]) -> list[ScheduledChunk]:
    """Chunks of output rows only (decodes) first, sorted by block table, so those sharing
    prefix blocks are neighbours and form groups."""
    return sorted(
        scheduled,
        key=lambda s: (num_prompt_rows(s) > 0, s.block_table if num_prompt_rows(s) == 0 else []),
    )


def spans_of(order: Sequence[ScheduledChunk]) -> tuple[list[Span], int, list[int], list[int]]:
    """The step's spans, output rows first; how many output rows; and each chunk's first
    output and prompt row.

    Which kernel a row's attention runs on depends only on the row, never on the batch: a
    query at an output position attends as a decode, alone over its context, whether it is
    today's decode, a proposed token being verified, or an output recomputed after a
    preemption; a query at a prompt position, as part of its prompt chunk. Both kernels give
    a row the same result whatever else is in the step, so a request's tokens do not depend
    on how the scheduler packed it (speculation's exactness rests on this).
    """
    spans: list[Span] = []
    output_base = [-1] * len(order)
    prompt_base = [-1] * len(order)
    row = 0
    for j, s in enumerate(order):
        n_prompt = num_prompt_rows(s)
        if n_prompt == s.num_tokens:
            continue
        tokens = s.token_ids
        output_base[j] = row
        for i in range(n_prompt, s.num_tokens):
            spans.append(Span(j, s.start + i, tokens[i : i + 1], s.block_table))
        row += s.num_tokens - n_prompt
    num_output_rows = row
    for j, s in enumerate(order):
        n_prompt = num_prompt_rows(s)
        if n_prompt == 0:
            continue
        prompt_base[j] = row
        tokens = s.token_ids if n_prompt == s.num_tokens else s.token_ids[:n_prompt]
        spans.append(Span(j, s.start, tokens, s.block_table))
        row += n_prompt
    return spans, num_output_rows, output_base, prompt_base


def flatten(
    spans: Sequence[Span], num_decodes: int, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
    """(input ids, positions, the attention batch) of spans in attention order: the first
    ``num_decodes`` are single output rows, the rest prompt chunks."""
    bs = block_size
    tokens: list[int] = []
    q_starts: list[int] = []
    for sp in spans:
        q_starts.append(len(tokens))
        tokens.extend(sp.tokens)
    input_ids = torch.tensor(tokens, dtype=torch.long, device=device)

    query_lens = [len(sp.tokens) for sp in spans]
    max_blocks = max(len(sp.block_table) for sp in spans)
    # Rows padded with block 0: entries past a row's context are never read.
    tables = torch.tensor(
        [sp.block_table + [0] * (max_blocks - len(sp.block_table)) for sp in spans],
        dtype=torch.long,
        device=device,
    )
    host_starts = [sp.start for sp in spans]
    starts = torch.tensor(host_starts, dtype=torch.long, device=device)
    if num_decodes == len(spans) or all(n == 1 for n in query_lens):
        req_of_token = torch.arange(len(spans), device=device)  # one token per span
        positions = starts
    else:
        # Position of each flat token: its span's start plus its offset within it.
        lens = torch.tensor(query_lens, dtype=torch.long, device=device)
        req_of_token = torch.repeat_interleave(torch.arange(len(spans), device=device), lens)
        offsets = torch.arange(len(tokens), device=device) - torch.repeat_interleave(
            torch.tensor(q_starts, device=device), lens
        )
        positions = starts[req_of_token] + offsets  # (T,)
    slot_mapping = tables[req_of_token, positions // bs] * bs + positions % bs
    batch = AttentionBatch(
        num_decodes=num_decodes,
        query_starts=q_starts,
        query_lens=query_lens,
        starts=host_starts,
        host_block_tables=[sp.block_table for sp in spans],
        block_tables=tables,
        start_positions=starts,
        slot_mapping=slot_mapping,
    )
    return input_ids, positions, batch


def prepare_inputs(
    scheduled: Sequence[ScheduledChunk],
    backend: AttentionBackend[Any, Any],
    block_size: int,
    device: torch.device,
) -> StepInputs:
    order = order_for_attention(scheduled)
    spans, num_decodes, output_base, prompt_base = spans_of(order)
    input_ids, positions, batch = flatten(spans, num_decodes, block_size, device)
    meta = backend.build_metadata(batch)
    inputs = StepInputs(order, input_ids, positions, batch, meta, output_base, prompt_base)
    if batch.num_prefills and not any(
        s.request.sampling_params.prompt_logprobs is not None for s in order
    ):
        restrict_to_sampled_rows(inputs, backend)
    return inputs


def restrict_to_sampled_rows(inputs: StepInputs, backend: AttentionBackend[Any, Any]) -> None:
    """Let the last layer compute only the rows that sample (``meta.output_rows``).

    A prompt chunk needs the final hidden state of its last token only, and only if that is
    the prompt's last one; its other tokens feed the next tokens through their keys and
    values, which every layer, the last included, still writes. So the last layer's queries,
    attention, output projection and MLP skip them: a 1/num_layers share of a prefill step's
    work. Each sampling chunk becomes a single query at its last position over its whole
    context; output rows, which all sample, come first as before, with the same metadata. (A
    step recomputing outputs after a preemption, whose output rows do not all sample, computes
    every row.) Off when a step asks for prompt logprobs, which need every row.
    """
    order, batch = inputs.order, inputs.batch
    d = batch.num_decodes
    sampled = {r for j, s in enumerate(order) if s.samples for r in inputs.sampled_rows(j)}
    if any(r not in sampled for r in range(d)):
        return
    sampling = [
        r
        for r in range(d, batch.num_rows)
        if batch.query_starts[r] + batch.query_lens[r] - 1 in sampled
    ]
    last_rows = [batch.query_starts[r] + batch.query_lens[r] - 1 for r in sampling]
    host_rows = [*range(d), *last_rows]
    rows = torch.tensor(host_rows, dtype=torch.long, device=inputs.input_ids.device)
    backend.restrict_output(inputs.meta, rows, batch.last_queries(sampling, rows))
    inputs.computed_rows = host_rows
