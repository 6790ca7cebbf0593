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
class StepInputs:
    """A step's rows in attention order and the tensors the model reads."""

    order: list[ScheduledChunk]  # decodes first (see order_for_attention)
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    batch: AttentionBatch
    meta: AttentionMetadata[Any, Any]

    @property
    def query_starts(self) -> list[int]:
        return self.batch.query_starts


def order_for_attention(scheduled: Sequence[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decodes (one query token) first, so attention can batch them in one call; decodes
    sorted by block table, so those sharing prefix blocks are neighbours and form groups."""
    return sorted(
        scheduled,
        key=lambda s: (s.num_tokens != 1, s.block_table if s.num_tokens == 1 else []),
    )


def flatten(
    order: Sequence[ScheduledChunk], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
    """(input ids, positions, the attention batch) of rows already in attention order."""
    bs = block_size
    tokens: list[int] = []
    q_starts: list[int] = []
    for s in order:
        q_starts.append(len(tokens))
        tokens.extend(s.request.all_token_ids[s.start : s.start + s.num_tokens])
    input_ids = torch.tensor(tokens, dtype=torch.long, device=device)

    num_decodes = sum(1 for s in order if s.num_tokens == 1)
    max_blocks = max(len(s.block_table) for s in order)
    # Rows padded with block 0: entries past a row's context are never read.
    tables = torch.tensor(
        [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in order],
        dtype=torch.long,
        device=device,
    )
    host_starts = [s.start for s in order]
    starts = torch.tensor(host_starts, dtype=torch.long, device=device)
    query_lens = [s.num_tokens for s in order]
    if num_decodes == len(order):
        req_of_token = torch.arange(len(order), device=device)  # one token per request
        positions = starts
    else:
        # Position of each flat token: its request's start plus its offset within it.
        lens = torch.tensor(query_lens, dtype=torch.long, device=device)
        req_of_token = torch.repeat_interleave(torch.arange(len(order), device=device), lens)
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
        host_block_tables=[s.block_table for s in order],
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
    input_ids, positions, batch = flatten(order, block_size, device)
    meta = backend.build_metadata(batch)
    inputs = StepInputs(order, input_ids, positions, batch, meta)
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
    context; decodes, which all sample, come first as before, with the same metadata. (A step
    with a one-token prompt chunk that does not sample among the decode rows, rare, computes
    every row.) Off when a step asks for prompt logprobs, which need every row.
    """
    order, batch = inputs.order, inputs.batch
    d = batch.num_decodes
    if not all(s.samples for s in order[:d]):
        return
    sampling = [r for r in range(d, len(order)) if order[r].samples]
    last_rows = [batch.query_starts[r] + batch.query_lens[r] - 1 for r in sampling]
    rows = torch.tensor([*range(d), *last_rows], dtype=torch.long, device=inputs.input_ids.device)
    backend.restrict_output(inputs.meta, rows, batch.last_queries(sampling, rows))
