"""The CPU runner keeps per-step buffers in the malloc heap instead of faulting them in anew."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Allocates, fills and frees a 64 MiB buffer (above glibc's largest automatic mmap threshold)
# once a "step", and prints the page faults of steps 4-6: what a step pays in steady state when
# the previous step's buffer went back to the system. Not the second step alone: a small
# allocation can land after the first buffer, so that freed chunk does not rejoin the heap's
# top, and torch's aligned request is 80 bytes larger than it; the heap grows once more and
# settles after that (this made a two-step probe fail one run in three).
_PROBE = """
import resource, sys, torch
from convoy.model.host_allocator import keep_step_buffers_on_heap
applied = keep_step_buffers_on_heap() if sys.argv[1] == "tuned" else False
def faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(3)
print(applied, faults(3))
"""


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    # 4 KiB pages, so the fault count measures the bytes faulted in.
    clean["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_step_buffers_are_reused_without_page_faults() -> None:
    applied, faults = _probe("tuned")
    assert applied
    assert faults < 1000  # 64 MiB is 16384 pages; three steps 49152
    # The control: glibc's defaults map and fault the buffer in again every step.
    applied, faults = _probe("default")
    assert not applied
    assert faults > 3 * 8000


def test_the_users_own_malloc_settings_win() -> None:
    applied, faults = _probe("tuned", MALLOC_MMAP_THRESHOLD_="131072")
    assert not applied
    assert faults > 3 * 8000
