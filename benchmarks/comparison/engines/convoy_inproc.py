"""convoy in this process: :class:`convoy.LLM`, timed by
:func:`convoy.bench.throughput.run_throughput`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.comparison.engines.base import RunResult
from benchmarks.comparison.machine import CPU, Target
from convoy.bench.workloads import BenchRequest


class ConvoyEngine:
    """convoy's offline API, float32 on the CPU (or per ``target``)."""

    def __init__(
        self,
        model_dir: Path,
        max_num_seqs: int,
        prefix_caching: bool = True,
        greedy_screening: bool = True,
        target: Target = CPU,
        name: str = "convoy",
    ) -> None:
        from convoy import LLM

        self.name = name
        self.llm = LLM(
            model=str(model_dir),
            device=target.device,
            dtype=target.dtype,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=prefix_caching,
            greedy_screening=greedy_screening,
        )
        # Whether greedy rows go through a screen of the head (bfloat16 or int8, by the CPU):
        # the tokens are float32's either way, the head's cost is not.
        self.screened = self.llm.engine.runner.greedy_head is not None
        sched = self.llm.engine.config.scheduler
        self.max_num_seqs = sched.max_num_seqs
        self.max_num_batched_tokens = sched.max_num_batched_tokens
        self._warm = False

    def unavailable(self) -> str | None:
        return None  # loaded in __init__, which raises where convoy cannot run

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        from convoy.bench.throughput import run_throughput

        result, timings = run_throughput(self.llm, requests, use_tqdm=False, warmup=not self._warm)
        self._warm = True
        return result.elapsed_s, [t.num_output_tokens for t in timings]
