"""The attention backend interface, and the step's batch every backend builds metadata from.

Memory layout of one layer's cache (keys and values alike)::

    cache: (num_blocks * block_size + extra, num_kv_heads, head_dim)
           slot = block_id * block_size + offset_in_block

The batch is ragged: ``T`` query tokens from all scheduled requests, concatenated, decodes
(one query token each) first, then prompt chunks. A layer writes its new keys and values to
their slots first (:meth:`AttentionBackend.write_kv`); then each query attends to its
request's whole context (:meth:`AttentionBackend.forward`). Because every key is written
before any query reads, a prompt chunk's queries see the chunk's own keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import torch

from convoy.model.attention.batch import AttentionBatch
from convoy.model.attention.shared_prefix import (
    SharedPrefixDecodes,
    find_shared_prefixes,
    shared_prefix_decode,
)
from convoy.model.cpu_kernels import CpuKernels

DecodeT = TypeVar("DecodeT")
PrefillT = TypeVar("PrefillT")

# The model's forward over a step: (input_ids, positions, metadata) -> final hidden states.
Forward = Callable[[torch.Tensor, torch.Tensor, "AttentionMetadata"], torch.Tensor]


@dataclass
class AttentionMetadata(Generic[DecodeT, PrefillT]):
    """What a layer's attention reads for one step; ``decode`` and ``prefill`` are the
    backend's own descriptions of the decode rows and of the prompt chunks."""

    slot_mapping: torch.Tensor  # (T,)
    num_decode_tokens: int  # the first D tokens are decodes, one per request
    decode: DecodeT | None
    prefill: PrefillT | None
    # Decodes grouped by shared leading blocks (prefix caching, n > 1), for layers without a
    # sliding window; None when no two rows share enough.
    shared_prefix: SharedPrefixDecodes | None = None
    # Set when only some rows' final hidden states are used (the sampled ones; a prompt chunk
    # that stops short of its last token samples nothing): those rows of the batch, in order,
    # and this metadata for them alone. The last layer then writes every row's keys and
    # values but computes queries, attention and MLP for these rows only.
    output_rows: torch.Tensor | None = None
    output_meta: AttentionMetadata[DecodeT, PrefillT] | None = None


class AttentionBackend(ABC, Generic[DecodeT, PrefillT]):
    """One way to run paged attention. Chosen once by the runner and given to every layer.

    Contract: :meth:`build_metadata` runs once a step, on the host, before the forward pass;
    :meth:`write_kv` and :meth:`forward` run in every layer and must not synchronize with the
    device; :meth:`run_model` runs the whole forward pass (a backend may replay it).
    """

    # A short name for logs and metrics.
    name: str = ""
    # KV cache slots past the blocks' own: the pad slot, kept at zero.
    extra_kv_slots = 1
    # Decodes sharing leading blocks may attend to them once for the group. Off when rows
    # must be batch-invariant: the group's sum runs in another order than a lone row's.
    share_prefixes = True

    def __init__(
        self,
        block_size: int,
        pad_slot: int,
        device: torch.device,
        kv_writer: CpuKernels | None = None,
    ) -> None:
        self.block_size = block_size
        # A slot kept at zero: padded positions read it (unwritten memory may hold NaN, and a
        # masked-out NaN still poisons attention, 0 * NaN = NaN).
        self.pad_slot = pad_slot
        self.device = device
        # convoy's CPU kernels, whose KV write (one row copy per token) replaces index_copy_.
        self.kv_writer = kv_writer

    # -- metadata, once a step ---------------------------------------------------------------
    def build_metadata(self, batch: AttentionBatch) -> AttentionMetadata[DecodeT, PrefillT]:
        d = batch.num_decodes
        shared = None
        if d and self.share_prefixes and self.groups_shared_prefixes(batch):
            shared = find_shared_prefixes(batch, self.block_size, self.pad_slot)
        return AttentionMetadata(
            slot_mapping=batch.slot_mapping,
            num_decode_tokens=d,
            decode=self.build_decode(batch) if d else None,
            prefill=self.build_prefill(batch) if batch.num_prefills else None,
            shared_prefix=shared,
        )

    def restrict_output(
        self,
        meta: AttentionMetadata[DecodeT, PrefillT],
        rows: torch.Tensor,
        batch: AttentionBatch,
    ) -> None:
        """Let the last layer compute only ``rows`` of the batch, described by ``batch`` (see
        :meth:`AttentionBatch.last_queries`); the decodes' metadata is the same object."""
        meta.output_rows = rows
        meta.output_meta = replace(
            meta,
            slot_mapping=batch.slot_mapping,
            prefill=self.build_prefill(batch) if batch.num_prefills else None,
            output_rows=None,
            output_meta=None,
        )

    def groups_shared_prefixes(self, batch: AttentionBatch) -> bool:
        """Whether this step's decodes may attend to shared prefixes once for the group."""
        return True

    @abstractmethod
    def build_decode(self, batch: AttentionBatch) -> DecodeT:
        """The decode rows' description (``batch.num_decodes > 0``)."""

    @abstractmethod
    def build_prefill(self, batch: AttentionBatch) -> PrefillT:
        """The prompt chunks' description (``batch.num_prefills > 0``)."""

    # -- every layer -------------------------------------------------------------------------
    def write_kv(
        self,
        k_cache: torch.Tensor,  # (S, Hkv, D)
        v_cache: torch.Tensor,
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,
        slot_mapping: torch.Tensor,  # (T,)
    ) -> None:
        """Store the new tokens' keys and values at their slots."""
        if self.kv_writer is not None:
            self.kv_writer.write_kv(k_cache, v_cache, k, v, slot_mapping)
            return
        k_cache.index_copy_(0, slot_mapping, k)
        v_cache.index_copy_(0, slot_mapping, v)

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D), rotary already applied
        k_cache: torch.Tensor,  # (S, Hkv, D)
        v_cache: torch.Tensor,
        meta: AttentionMetadata[DecodeT, PrefillT],
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """Attention of each query over its request's cached context; returns ``(T, H, D)``."""
        out = torch.empty_like(q)
        d = meta.num_decode_tokens
        if d and window is None and meta.shared_prefix is not None:
            out[:d] = shared_prefix_decode(q[:d], k_cache, v_cache, meta.shared_prefix, scale)
        elif d:
            assert meta.decode is not None
            self.decode_attention(out[:d], q[:d], k_cache, v_cache, meta.decode, scale, window)
        if meta.prefill is not None:
            self.prefill_attention(out, q, k_cache, v_cache, meta.prefill, scale, window)
        return out

    @abstractmethod
    def decode_attention(
        self,
        out: torch.Tensor,  # (D, H, Dh), written
        q: torch.Tensor,  # (D, H, Dh)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        decode: DecodeT,
        scale: float,
        window: int | None,
    ) -> None: ...

    @abstractmethod
    def prefill_attention(
        self,
        out: torch.Tensor,  # (T, H, Dh): the prompt chunks' rows are written
        q: torch.Tensor,  # (T, H, Dh)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        prefill: PrefillT,
        scale: float,
        window: int | None,
    ) -> None: ...

    # -- the whole forward pass ----------------------------------------------------------------
    def run_model(
        self,
        forward: Forward,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata[DecodeT, PrefillT],
    ) -> torch.Tensor:
        """The step's final hidden states; a backend may replay a captured forward."""
        return forward(input_ids, positions, meta)
