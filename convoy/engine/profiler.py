"""Where a step's time goes: the engine's host work against the model's forward pass.

A step is split into phases, timed with ``time.perf_counter`` (on the CPU torch ops are
synchronous, so a phase's wall time is its cost; on CUDA the forward would need a sync and is
reported as launched):

* ``schedule``: the scheduler's plan (admission, block allocation, preemption);
* ``prepare``: flattening the batch into token ids, positions, slots and attention metadata;
* ``forward``: the decoder layers;
* ``logits``: the vocabulary projection of the rows that sample;
* ``sample``: the sampler and the per-request logprob lists;
* ``process``: updating requests, stop checks, detokenization, building outputs.

``forward`` and ``logits`` are the model; the rest is host overhead, what the issue's "host
time per step" counts.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PHASES = ("schedule", "prepare", "forward", "logits", "sample", "process")
MODEL_PHASES = frozenset({"forward", "logits"})


@dataclass
class StepTiming:
    """One step: its batch shape and the seconds spent in each phase."""

    num_decodes: int
    num_prefill_tokens: int
    schedule: float = 0.0
    prepare: float = 0.0
    forward: float = 0.0
    logits: float = 0.0
    sample: float = 0.0
    process: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, p) for p in PHASES)

    @property
    def host(self) -> float:
        return sum(getattr(self, p) for p in PHASES if p not in MODEL_PHASES)


class StepProfiler:
    """Collects :class:`StepTiming` for every step while enabled (see ``LLMEngine.profiler``)."""

    def __init__(self) -> None:
        self.steps: list[StepTiming] = []

    def record(self, timing: StepTiming) -> None:
        self.steps.append(timing)

    def summary(self) -> dict[str, Any]:
        """Totals and shares per phase, the host share, and per-step medians."""
        total = sum(s.total for s in self.steps)
        phases = {
            p: {
                "total_s": sum(getattr(s, p) for s in self.steps),
                "share": (sum(getattr(s, p) for s in self.steps) / total) if total else 0.0,
                "median_ms": (
                    statistics.median(getattr(s, p) for s in self.steps) * 1e3
                    if self.steps
                    else 0.0
                ),
            }
            for p in PHASES
        }
        host = sum(s.host for s in self.steps)
        return {
            "num_steps": len(self.steps),
            "total_s": total,
            "host_s": host,
            "host_share": host / total if total else 0.0,
            "median_step_ms": statistics.median(s.total for s in self.steps) * 1e3
            if self.steps
            else 0.0,
            "phases": phases,
        }

    def format_table(self) -> str:
        s = self.summary()
        lines = [
            f"step profile: {s['num_steps']} steps, {s['total_s']:.2f} s, "
            f"median step {s['median_step_ms']:.2f} ms, host share {s['host_share'] * 100:.1f}%",
            f"  {'phase':<10} {'total s':>9} {'share':>7} {'median ms':>10}",
        ]
        for name, p in s["phases"].items():
            kind = "model" if name in MODEL_PHASES else "host"
            lines.append(
                f"  {name:<10} {p['total_s']:>9.3f} {p['share'] * 100:>6.1f}% "
                f"{p['median_ms']:>10.3f}  ({kind})"
            )
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        """The summary and every step's timing as JSON."""
        path.write_text(
            json.dumps({"summary": self.summary(), "steps": [asdict(s) for s in self.steps]}) + "\n"
        )
