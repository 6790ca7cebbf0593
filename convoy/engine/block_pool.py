"""The pool of KV cache blocks: ids and reference counts, no tensors.

A block holds the keys and values of ``block_size`` consecutive tokens of one sequence, in
every layer. The model runner owns the memory; this pool only decides which block ids are
free and who holds the others.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np


class BlockPoolError(RuntimeError):
    """The pool's bookkeeping is broken (a bug in the engine, never the caller's fault)."""


class BlockPool:
    """Fixed set of block ids ``0 .. num_blocks-1`` with reference counts.

    Invariants (checked by :meth:`check_integrity`):
      * every block is either free (ref count 0, in the free queue once) or in use (ref >= 1);
      * ``num_free + num_in_use == num_blocks``.

    Free blocks are handed out oldest-freed first (FIFO), so which ids a request gets is
    deterministic and tests can assert them exactly.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # numpy so that the integrity check stays cheap with hundreds of thousands of blocks.
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each); raises if fewer are free."""
        if n > len(self._free):
            raise BlockPoolError(f"asked for {n} blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self.ref_counts[blocks] = 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; those that reach zero become free, in order."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise BlockPoolError(f"block {b} freed while not in use")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)

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
