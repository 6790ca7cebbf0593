"""Paged attention with convoy's C++ kernels: keys and values read in place from the cache
through the block tables, no gathered copy (float32 CPU models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convoy.model.attention.base import AttentionBackend
from convoy.model.attention.batch import AttentionBatch
from convoy.model.cpu_kernels import CpuKernels


@dataclass
class PagedDecode:
    block_tables: torch.Tensor  # (D, B)
    context_lens: torch.Tensor  # (D,)


@dataclass
class PagedPrefill:
    """Each chunk's block table and its queries: rows ``query_starts[c]`` on,
    ``num_queries[c]`` of them, at positions ``positions[c]`` on."""

    block_tables: torch.Tensor  # (C, B)
    query_starts: torch.Tensor  # (C,)
    positions: torch.Tensor  # (C,)
    num_queries: torch.Tensor  # (C,)


class CpuKernelAttention(AttentionBackend[PagedDecode, PagedPrefill]):
    """The kernels work in 8-float vectors: head dims must be a multiple of 8."""

    name = "cpu-kernels"

    def __init__(
        self, block_size: int, pad_slot: int, device: torch.device, kernels: CpuKernels
    ) -> None:
        super().__init__(block_size, pad_slot, device, kv_writer=kernels)
        self.kernels = kernels

    @staticmethod
    def supports(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and head_dim % 8 == 0

    def build_decode(self, batch: AttentionBatch) -> PagedDecode:
        d = batch.num_decodes
        return PagedDecode(batch.block_tables[:d], batch.start_positions[:d] + 1)

    def build_prefill(self, batch: AttentionBatch) -> PagedPrefill:
        d = batch.num_decodes
        device = batch.block_tables.device
        return PagedPrefill(
            block_tables=batch.block_tables[d:],
            query_starts=torch.tensor(batch.query_starts[d:], dtype=torch.long, device=device),
            positions=batch.start_positions[d:],
            num_queries=torch.tensor(batch.query_lens[d:], dtype=torch.long, device=device),
        )

    def decode_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        decode: PagedDecode,
        scale: float,
        window: int | None,
    ) -> None:
        self.kernels.paged_decode_attention(
            out,
            q.contiguous(),
            k_cache,
            v_cache,
            decode.block_tables,
            decode.context_lens,
            self.block_size,
            scale,
            window or 0,
        )

    def prefill_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        prefill: PagedPrefill,
        scale: float,
        window: int | None,
    ) -> None:
        # The kernel masks each row itself (causal, and the window).
        self.kernels.paged_prefill_attention(
            out,
            q,
            k_cache,
            v_cache,
            prefill.block_tables,
            prefill.query_starts,
            prefill.positions,
            prefill.num_queries,
            self.block_size,
            scale,
            window or 0,
        )
