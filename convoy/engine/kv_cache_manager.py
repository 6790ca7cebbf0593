"""Per-request block tables on top of the :class:`BlockPool`, with prefix caching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convoy.engine.block_pool import BlockPool, BlockPoolError
from convoy.engine.prefix_cache import extend_block_hashes
from convoy.engine.request import Request
from convoy.utils import cdiv


class KVCacheManager:
    """Which blocks each request holds; grows tables as requests compute more tokens.

    The verbs read as a protocol: the scheduler asks :meth:`find_cached_prefix` which leading
    blocks of a new request are already computed, asks :meth:`allocate_slots` for room for the
    tokens it wants to compute this step (False, and nothing taken, when the pool is short),
    and calls :meth:`free` when a request finishes or is preempted.

    Prefix caching: a block is named (cached) as soon as a step is scheduled to fill it, so
    that a request admitted in the same step can already share it. That is safe because the
    model writes every new key/value of a layer before any query of the layer reads the
    cache. If the step then fails, :meth:`reset_prefix_cache` forgets every name.

    With ``enable_prefix_caching=False`` blocks are still named, but requests get private
    namespaces (so only the samples of one ``n > 1`` request share their prompt) and a
    block's name is dropped as soon as nobody holds it.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        # How many leading blocks of each table are named in the pool's cache.
        self._num_named: dict[str, int] = {}
        # Prompt tokens looked up in the cache at admission, and how many were found.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Names of the request's first ``num_blocks`` full blocks (fewer if it is shorter)."""
        hashes = request.block_hashes
        if len(hashes) < num_blocks:
            # Only the tokens needed: hashing the whole prompt at every decode would be waste.
            tokens = request.all_token_ids[: num_blocks * self.block_size]
            extend_block_hashes(hashes, request.cache_root, tokens, self.block_size)
        return hashes[:num_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks a new request can start from (no side effects).

        At least the last token is always left to compute: its logits give the next token.
        """
        if not request.lookup_prefix_cache:
            return []
        blocks = []
        for h in self.block_hashes(request, (request.num_tokens - 1) // self.block_size):
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens of ``request``.

        ``cached_blocks`` (from :meth:`find_cached_prefix`, for a request that holds no blocks
        yet) become the start of its table; ``num_new_tokens`` then count from their end. All
        or nothing: on False no block was taken.
        """
        rid = request.request_id
        table = self.block_tables.get(rid)
        if table is None:
            computed = len(cached_blocks) * self.block_size
            needed = self.num_blocks_for(computed + num_new_tokens) - len(cached_blocks)
            # Hits that nobody holds are in the free queue: taking them uses up free blocks.
            reclaimed = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
            if needed + reclaimed > self.pool.num_free_blocks:
                return False
            self.pool.touch(cached_blocks)
            table = [*cached_blocks, *self.pool.allocate(max(0, needed))]
            self.block_tables[rid] = table
            self._num_named[rid] = len(cached_blocks)
            if request.lookup_prefix_cache:
                self.num_queried_tokens += request.num_tokens
                self.num_hit_tokens += computed
        else:
            computed = request.num_computed_tokens
            needed = self.num_blocks_for(computed + num_new_tokens) - len(table)
            if needed > self.pool.num_free_blocks:
                return False
            if needed > 0:
                table.extend(self.pool.allocate(needed))
        self._name_full_blocks(request, table, computed + num_new_tokens)
        return True

    def _name_full_blocks(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Cache the blocks that ``num_tokens`` computed tokens fill completely."""
        rid = request.request_id
        first = self._num_named[rid]
        # Only tokens the request knows can name a block.
        full = min(num_tokens, request.num_tokens) // self.block_size
        if full <= first:
            return
        hashes = self.block_hashes(request, full)
        for i in range(first, full):
            self.pool.cache(table[i], hashes[i])
        self._num_named[rid] = full

    def free_trailing(self, request: Request, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` of ``request`` (rejected draft
        rows). They were never named: names cover known tokens only."""
        table = self.block_tables.get(request.request_id)
        if table is None:
            return
        keep = self.num_blocks_for(num_tokens)
        if len(table) > keep:
            assert self._num_named[request.request_id] <= keep
            tail = table[keep:]
            del table[keep:]
            self.pool.free(reversed(tail), keep_cached=self.enable_prefix_caching)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def free(self, request: Request) -> None:
        """Return every block of ``request`` to the pool (no-op if it holds none)."""
        self._num_named.pop(request.request_id, None)
        table = self.block_tables.pop(request.request_id, None)
        if table:
            # Reversed: the tail of a sequence is the least likely part to be reused, so it
            # is evicted first.
            self.pool.free(reversed(table), keep_cached=self.enable_prefix_caching)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their contents may be wrong, e.g. after a failed step)."""
        self.pool.reset_cache()
        for rid in self._num_named:
            # Blocks still held stay in their tables but are never named again: a later
            # request simply computes those tokens itself.
            self._num_named[rid] = len(self.block_tables[rid])

    def check_integrity(self, live_request_ids: set[str] | None = None) -> None:
        """Pool invariants, plus: tables hold each block once and only live requests hold any."""
        self.pool.check_integrity()
        counts = np.zeros(self.pool.num_blocks, dtype=np.int32)
        for rid, table in self.block_tables.items():
            if live_request_ids is not None and rid not in live_request_ids:
                raise BlockPoolError(f"finished request {rid!r} still holds blocks {table}")
            if len(set(table)) != len(table):
                raise BlockPoolError(f"request {rid!r} holds a block twice: {table}")
            np.add.at(counts, table, 1)
        if not np.array_equal(counts, self.pool.ref_counts):
            raise BlockPoolError("block tables disagree with the pool's reference counts")
        if not self.enable_prefix_caching:
            # Names only live while someone holds the block.
            orphans = [b for b in self.pool.cached.values() if self.pool.ref_counts[b] == 0]
            if orphans:
                raise BlockPoolError(f"prefix caching is off but free blocks {orphans} are cached")
