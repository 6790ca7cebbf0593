"""Per-request block tables on top of the :class:`BlockPool`."""

from __future__ import annotations

import numpy as np

from convoy.engine.block_pool import BlockPool, BlockPoolError
from convoy.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Which blocks each request holds; grows tables as requests compute more tokens.

    The paired verbs read as a protocol: the scheduler asks :meth:`allocate_slots` for room
    for the tokens it wants to compute this step (it returns False, allocating nothing, when
    the pool is short) and calls :meth:`free` when a request finishes or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens of ``request``.

        All or nothing: on False no block was taken.
        """
        table = self.block_tables.setdefault(request.request_id, [])
        needed = self.num_blocks_for(request.num_computed_tokens + num_new_tokens) - len(table)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        table.extend(self.pool.allocate(needed))
        return True

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def free(self, request: Request) -> None:
        """Return every block of ``request`` to the pool (no-op if it holds none)."""
        table = self.block_tables.pop(request.request_id, None)
        if table:
            # Reversed: the tail of a sequence is the least likely part to be reused, so it
            # should be first in line to be handed out again (matters once prefixes are cached).
            self.pool.free(reversed(table))

    def check_integrity(self, live_request_ids: set[str] | None = None) -> None:
        """Pool invariants, plus: tables hold each block once and only live requests hold any."""
        self.pool.check_integrity()
        counts = np.zeros(self.pool.num_blocks, dtype=np.int32)
        for rid, table in self.block_tables.items():
            if live_request_ids is not None and rid not in live_request_ids:
                raise BlockPoolError(f"finished request {rid!r} still holds blocks {table}")
            np.add.at(counts, table, 1)
        if not np.array_equal(counts, self.pool.ref_counts):
            raise BlockPoolError("block tables disagree with the pool's reference counts")
