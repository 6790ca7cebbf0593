"""Keep a CPU forward pass's temporary buffers in the malloc heap between steps.

Each step allocates and frees the same large activations (a 64-row decode step of a 200M
model: several 1-2 MB buffers per layer; a 2048-token prefill chunk: tens of MB). glibc serves
a request above its mmap threshold with a fresh ``mmap`` and unmaps it on free, and trims the
heap's free top back to the system; either way the next step faults the pages in again and
the kernel zeroes every one (with transparent huge pages, 2 MB at a time). That zeroing is a
measurable share of a batched run; with the thresholds raised, most of those page faults are
gone (figures in docs/performance/README.md).

Raising both thresholds once the weights and the KV cache exist keeps those long-lived
buffers mapped on their own (freed back to the system with their engine) while the per-step
ones are recycled from the heap. The cost: up to ``TRIM_THRESHOLD`` bytes of freed heap stay
resident, in practice the largest step's temporaries, which the step needed anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Buffers up to this size come from the heap: above any one step's activations at the
# default token budget (2048 tokens x a 2 x 14336 gate/up projection of an 8B model: 235 MB).
MMAP_THRESHOLD = 256 << 20
# Free heap kept at the top before it is returned: room for a whole step's temporaries.
TRIM_THRESHOLD = 512 << 20

# The user's own malloc tuning (environment variables or tunables) wins.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_applied: bool | None = None


def keep_step_buffers_on_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); ``True`` if they are
    in effect. Does nothing outside glibc, or where the user tunes malloc themselves."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(name) for name in _USER_SETTINGS):
        logger.debug("malloc thresholds left to the user's settings")
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # another allocator preloaded without it
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either one also stops glibc from moving the mmap threshold itself, so set both.
    _applied = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
    return _applied
