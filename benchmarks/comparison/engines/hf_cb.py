"""transformers continuous batching (what ``model.generate_batch`` drives), in this process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.comparison.engines.base import RunResult
from benchmarks.comparison.engines.hf_static import hf_model
from benchmarks.comparison.machine import CPU, Target
from benchmarks.comparison.results import EngineError
from convoy.bench.workloads import BenchRequest

NAME = "transformers CB"


def has_generate_batch() -> bool:
    """Whether this transformers has continuous batching at all."""
    from transformers import LlamaForCausalLM

    return hasattr(LlamaForCausalLM, "generate_batch")


class HFContinuousEngine:
    """transformers continuous batching (``ContinuousBatchingManager``, what
    ``model.generate_batch`` drives), float32 on the CPU (or per ``target``).

    ``generate_batch`` builds a new manager per call (KV cache allocation, thread start)
    inside the call; convoy's timed run excludes its engine construction, so here the manager
    is built, started and warmed up before the clock starts, and the timed part is
    ``add_requests`` plus collecting every result, as ``generate_batch`` does.
    """

    def __init__(self, model_dir: Path, target: Target = CPU) -> None:
        self.model = hf_model(model_dir, target)

    def run(self, requests: Sequence[BenchRequest], max_requests: int) -> RunResult:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        out_len = requests[0].output_len
        if any(r.output_len != out_len for r in requests):
            raise EngineError("one max_new_tokens per manager: output lengths must be equal")
        gen = GenerationConfig(
            max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        cb = ContinuousBatchingConfig(max_requests_per_batch=max_requests)
        hints = WorkloadHints(
            max_prompt_length=max(r.input_len for r in requests),
            max_generated_length=out_len,
            num_requests=len(requests),
        )
        manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb, workload_hints=hints
        )
        manager.start()
        try:
            self._collect(manager, [list(requests[0].prompt_token_ids[:16])], 2)  # warm-up
            start = time.perf_counter()
            lens = self._collect(manager, [list(r.prompt_token_ids) for r in requests], out_len)
            elapsed = time.perf_counter() - start
        finally:
            manager.stop(block=True, timeout=30)
        return elapsed, lens

    @staticmethod
    def _collect(manager: Any, inputs: list[list[int]], max_new_tokens: int) -> list[int]:
        """Submit ``inputs`` and wait for all; output lengths in input order."""
        ids = manager.add_requests(inputs=inputs, max_new_tokens=max_new_tokens)
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise EngineError("the continuous batching thread stopped (see log above)")
                continue
            if res.is_finished():
                if res.error:
                    raise EngineError(f"continuous batching: {res.error}")
                done[res.request_id] = res
        return [len(done[i].generated_tokens) for i in ids]


class HFContinuous:
    """One ``max_requests_per_batch`` of a loaded :class:`HFContinuousEngine`."""

    name = NAME

    def __init__(self, engine: HFContinuousEngine, max_requests: int) -> None:
        self.engine, self.max_requests = engine, max_requests

    def unavailable(self) -> str | None:
        return None  # the engine loaded, or it raised

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        return self.engine.run(requests, self.max_requests)
