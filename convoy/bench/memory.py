"""Memory a run used against what it should need: the weights plus the KV cache.

Peak resident memory is the process's high-water mark (``ru_maxrss``), so it also counts
the Python interpreter, torch's libraries and the tokenizer: the budget the issue sets is
weights + KV cache + 15 %.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from convoy.model.linear import Linear

if TYPE_CHECKING:
    from convoy.entrypoints.llm import LLM

GIB = 2**30


@dataclass
class MemoryReport:
    weights_bytes: int
    kv_cache_bytes: int
    peak_rss_bytes: int

    @property
    def expected_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def overhead(self) -> float:
        """Peak RSS over weights + KV cache, minus one (0.15 = 15 % above)."""
        return self.peak_rss_bytes / self.expected_bytes - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overhead": self.overhead}

    def format_table(self) -> str:
        return (
            f"memory: weights {self.weights_bytes / GIB:.3f} GiB + KV cache "
            f"{self.kv_cache_bytes / GIB:.3f} GiB = {self.expected_bytes / GIB:.3f} GiB; "
            f"peak RSS {self.peak_rss_bytes / GIB:.3f} GiB ({self.overhead * 100:+.1f}%)"
        )


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def memory_report(llm: LLM) -> MemoryReport:
    """Weights (tied tensors once) and KV cache bytes of ``llm``'s engine, and the peak RSS."""
    runner = llm.engine.runner
    seen: set[int] = set()
    weights = 0
    for t in [*runner.model.parameters(), *runner.model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weights += t.numel() * t.element_size()
    # oneDNN-packed weights live outside parameters and buffers (opaque tensors).
    for m in runner.model.modules():
        if isinstance(m, Linear) and m.onednn_weight is not None and m.onednn_weight.is_mkldnn:
            weights += m.onednn_weight.numel() * m.onednn_weight.element_size()
    if runner.greedy_head is not None:  # its bfloat16 or int8 copy of the head, and bounds
        for t in runner.greedy_head.own_tensors():
            weights += t.numel() * t.element_size()
    kv = runner.kv_cache.numel() * runner.kv_cache.element_size()
    return MemoryReport(weights, kv, peak_rss_bytes())
