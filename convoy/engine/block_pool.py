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

    A block is *in use* (ref count >= 1) or *free* (ref count 0, in the free queue). A block
    may also be *cached*: its contents are known by a hash (see
    :func:`convoy.engine.prefix_cache.hash_block`). A cached block keeps its hash after its last
    holder lets go, so it can be found and reused until the pool needs the room: free blocks
    are handed out least recently freed first, and a cached one loses its hash (is evicted)
    only then.

    Invariants (checked by :meth:`check_integrity`):
      * every block is either free (ref count 0, in the free queue once) or in use (ref >= 1);
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
        # Free blocks in eviction order (least recently freed first). An OrderedDict, because a
        # cache hit takes a free block out of the middle of the queue.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached ones included (they are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0 (cached blocks nobody holds count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each), evicting cached ones; raises if short."""
        if n > len(self._free):
            raise BlockPoolError(f"asked for {n} blocks, only {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._uncache(b)
            blocks.append(b)
        self.ref_counts[blocks] = 1
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Take one more reference to each block (cache hits); free ones leave the free queue."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._free[b]
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
                self._free[b] = None

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

    def check_integrity(self) -> None:
        """Raise :class:`BlockPoolError` if any invariant is broken."""
        free = np.fromiter(self._free, dtype=np.int64, count=len(self._free))
        is_free = np.zeros(self.num_blocks, dtype=bool)
        is_free[free] = True
        if int(is_free.sum()) != len(free):
            raise BlockPoolError("a block is in the free queue twice")
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
