"""The step's batch as the runner flattens it: what every attention backend reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    """The step's rows (one per scheduled request) as the runner flattened them.

    The first ``num_decodes`` rows compute one token each; the rest are prompt chunks. Row
    ``r`` has queries ``query_starts[r] .. query_starts[r] + query_lens[r] - 1`` of the
    batch, at positions ``starts[r]`` on, and attends to positions
    ``0 .. starts[r] + query_lens[r] - 1`` held in the blocks of its block table. Host lists
    and device tensors both, so that no backend reads a device value back to the host.
    """

    num_decodes: int
    query_starts: list[int]
    query_lens: list[int]
    starts: list[int]
    host_block_tables: Sequence[Sequence[int]]
    block_tables: torch.Tensor  # (R, B) padded with block 0: entries past a context are unread
    start_positions: torch.Tensor  # (R,) ``starts`` on the device
    slot_mapping: torch.Tensor  # (T,) where each new token's key and value go

    @property
    def num_rows(self) -> int:
        return len(self.query_lens)

    @property
    def num_prefills(self) -> int:
        return self.num_rows - self.num_decodes

    def last_queries(self, prefill_rows: Sequence[int], rows: torch.Tensor) -> AttentionBatch:
        """This batch cut to the decodes and, of the prompt chunks, ``prefill_rows`` alone,
        each reduced to its last query over its whole context; ``rows`` are the batch rows
        that remain (decodes first, then each kept chunk's last query)."""
        d = self.num_decodes
        keep = [*range(d), *prefill_rows]
        starts = self.starts[:d] + [self.starts[r] + self.query_lens[r] - 1 for r in prefill_rows]
        device = self.block_tables.device
        return AttentionBatch(
            num_decodes=d,
            query_starts=list(range(len(keep))),
            query_lens=[1] * len(keep),
            starts=starts,
            host_block_tables=[self.host_block_tables[r] for r in keep],
            block_tables=self.block_tables.index_select(
                0, torch.tensor(keep, dtype=torch.long, device=device)
            ),
            start_positions=torch.tensor(starts, dtype=torch.long, device=device),
            slot_mapping=self.slot_mapping.index_select(0, rows),
        )
