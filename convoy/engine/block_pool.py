"""The pool of KV cache blocks: ids, reference counts and the prefix cache, no tensors.

A block holds the keys and values of ``block_size`` consecutive tokens of one sequence, in
every layer. The model runner owns the memory; this pool only decides which block ids are
free, who holds the others, and which full blocks are known by their contents (their hash)
so that another request with the same prefix can use them instead of recomputing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np


class BlockPoolError(RuntimeError):
    """The pool's bookkeeping is broken (a bug in the engine, never the caller's fault)."""


class BlockPool:
    """Fixed set of block ids ``0 .. num_blocks-1`` with reference counts and a prefix cache.

    A block is *in use* (ref count >= 1) or *free* (ref count 0). A block may also be
    *cached*: its contents are known by a hash (see
    :func:`convoy.engine.prefix_cache.hash_block`). A cached block keeps its hash after its last
    holder lets go, so it can be found and reused until the pool needs the room.

    Free blocks are handed out in this order:

    1. blocks holding nothing worth keeping, most recently freed first: their memory has been
       written before (the kernel has backed it with pages) and is likely still in the CPU's
       caches;
    2. never-used blocks, lowest id first, so the cache's memory is first touched (and paged
       in) only as far as the peak load needs, not swept through run after run;
    3. cached blocks, least recently freed first, each losing its hash (evicted) only then.

    Invariants (checked by :meth:`check_integrity`):
      * every block is either free (ref count 0, in exactly one free list once) or in use
        (ref >= 1); the cached free list holds exactly the free blocks that carry a hash;
      * ``num_free + num_in_use == num_blocks``;
      * the hash -> block map and each block's hash agree, one block per hash.

    Everything is ordered, so which ids a request gets is deterministic and tests can assert
    them exactly.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # numpy so that the integrity check stays cheap with hundreds of thousands of blocks.
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        # Free blocks without a hash: a stack, the top (end) handed out first; the never-used
        # ids sit below every freed one, lowest on top.
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        # Free blocks with a hash, in eviction order (least recently freed first). An
        # OrderedDict, because a cache hit takes a free block out of the middle of the queue.
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached ones included (they are evicted on demand)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0 (cached blocks nobody holds count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each), evicting cached ones only when no other
        block is free; raises if short."""
        if n > self.num_free_blocks:
            raise BlockPoolError(f"asked for {n} blocks, only {self.num_free_blocks} free")
        take = min(n, len(self._free_plain))
        blocks = self._free_plain[len(self._free_plain) - take :][::-1]
        del self._free_plain[len(self._free_plain) - take :]
        for _ in range(n - take):
            b, _ = self._free_cached.popitem(last=False)
            self._uncache(b)
            blocks.append(b)
        self.ref_counts[blocks] = 1
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Take one more reference to each block (cache hits); free ones leave the free lists."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                if b in self._free_cached:
                    del self._free_cached[b]
                else:  # not reached by cache hits (those are cached); kept correct anyway
                    self._free_plain.remove(b)
            self.ref_counts[b] += 1

    def free(self, blocks: Iterable[int], *, keep_cached: bool = True) -> None:
        """Drop one reference to each block; those that reach zero become free, in order.

        A freed block that is cached stays findable until evicted, unless ``keep_cached`` is
        False (the prefix cache is off: its hash only served the request's own samples).
        """
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise BlockPoolError(f"block {b} freed while not in use")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if not keep_cached:
                    self._uncache(b, evicted=False)
                if self.block_hash[b] is None:
                    self._free_plain.append(b)
                else:
                    self._free_cached[b] = None

    # -- prefix cache ------------------------------------------------------------------------
    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block: int, block_hash: bytes) -> None:
        """Record that in-use ``block`` holds the tokens ``block_hash`` stands for.

        If another block already holds them (two requests computed the same prefix at once),
        the first stays the cached one and ``block`` stays private to its request.
        """
        if self.ref_counts[block] <= 0:
            raise BlockPoolError(f"block {block} cached while not in use")
        current = self.block_hash[block]
        if current is not None:
            if current != block_hash:
                raise BlockPoolError(f"block {block} is already cached with another hash")
            return
        if block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def _uncache(self, block: int, *, evicted: bool = True) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            del self.cached[h]
            if evicted:
                self.num_evictions += 1

    def reset_cache(self) -> None:
        """Forget every hash (the blocks' contents can no longer be trusted)."""
        for b in self.cached.values():
            self.block_hash[b] = None
        self.cached.clear()
        # The formerly cached free blocks join the plain ones, the most recently freed on top.
        self._free_plain.extend(self._free_cached)
        self._free_cached.clear()

    def check_integrity(self) -> None:
        """Raise :class:`BlockPoolError` if any invariant is broken."""
        free = np.array([*self._free_plain, *self._free_cached], dtype=np.int64)
        is_free = np.zeros(self.num_blocks, dtype=bool)
        is_free[free] = True
        if int(is_free.sum()) != len(free):
            raise BlockPoolError("a block is free twice")
        if (self.ref_counts < 0).any():
            bad = int(np.argmax(self.ref_counts < 0))
            raise BlockPoolError(f"block {bad} has negative ref count {self.ref_counts[bad]}")
        wrong = (self.ref_counts == 0) != is_free
        if wrong.any():
            b = int(np.argmax(wrong))
            raise BlockPoolError(f"block {b}: ref count {self.ref_counts[b]} but free={is_free[b]}")
        in_use = int((self.ref_counts > 0).sum())
        if in_use + len(free) != self.num_blocks:
            raise BlockPoolError(
                f"free ({len(free)}) + in use ({in_use}) != total ({self.num_blocks})"
            )
        for h, b in self.cached.items():
            if self.block_hash[b] != h:
                raise BlockPoolError(f"cached block {b} does not carry its hash")
        if self.num_blocks - self.block_hash.count(None) != len(self.cached):
            raise BlockPoolError("a block carries a hash the cache does not know")
        hashed = np.zeros(self.num_blocks, dtype=bool)
        hashed[np.fromiter(self.cached.values(), dtype=np.int64, count=len(self.cached))] = True
        in_cached_list = np.zeros(self.num_blocks, dtype=bool)
        in_cached_list[list(self._free_cached)] = True
        if ((is_free & hashed) != in_cached_list).any():
            raise BlockPoolError("the cached free list is not exactly the free cached blocks")
