"""Content hashes that name KV blocks for the prefix cache.

A full block is named by a hash chain: the hash of its own tokens together with the hash of
the block before it, so two blocks share a name only if the whole sequence up to and
including them is the same. The chain starts from a namespace root that covers everything
else that changes the keys and values (a per-request ``cache_salt``; later, an adapter id), so
requests in different namespaces never share blocks.

SHA-256 rather than Python's ``hash``: a collision would silently serve another prompt's KV,
so names must be collision-free in practice, and they must not depend on the process.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_ROOT = b"convoy-prefix-cache-v1"


def namespace_root(*parts: str | None) -> bytes:
    """The chain root for blocks computed under ``parts`` (e.g. a cache salt); ``None`` skips."""
    h = hashlib.sha256(_ROOT)
    for part in parts:
        if part is None:
            h.update(b"\x00")
        else:
            data = part.encode("utf-8")
            # Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            h.update(b"\x01" + len(data).to_bytes(8, "little") + data)
    return h.digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Name of a full block holding ``token_ids`` after the block named ``parent`` (or a root)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def extend_block_hashes(
    hashes: list[bytes], root: bytes, token_ids: Sequence[int], block_size: int
) -> list[bytes]:
    """Append to ``hashes`` the names of the full blocks of ``token_ids`` it lacks; returns it."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else root
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes
