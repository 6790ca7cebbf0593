"""transformers ``generate`` on static, left-padded batches, in this process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.comparison.engines.base import RunResult
from benchmarks.comparison.machine import CPU, Target
from benchmarks.comparison.results import EngineError
from convoy.bench.workloads import BenchRequest

NAME = "transformers static"


def hf_model(model_dir: Path, target: Target) -> Any:
    """The checkpoint as a transformers model on ``target``, set never to stop at EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=target.torch_dtype())
    model.to(target.device).eval()
    # No EOS: generation runs exactly max_new_tokens (min_new_tokens would instead mask EOS
    # logits, which changes the work and the tokens).
    model.generation_config.eos_token_id = None
    return model


class HFStaticEngine:
    """transformers ``generate`` on static left-padded batches of ``batch_size`` requests."""

    def __init__(self, model_dir: Path, target: Target = CPU) -> None:
        self.target = target
        self.model = hf_model(model_dir, target)
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self._warm = False

    def _batch(self, requests: Sequence[BenchRequest]) -> list[int]:
        import torch

        width = max(r.input_len for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - r.input_len :] = torch.tensor(r.prompt_token_ids)
            mask[i, width - r.input_len :] = 1
        out_len = requests[0].output_len
        if any(r.output_len != out_len for r in requests):
            raise EngineError("a static batch needs one output length")
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.target.device),
                attention_mask=mask.to(self.target.device),
                max_new_tokens=out_len,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        self.target.synchronize()
        return [int(out.shape[1] - width)] * len(requests)

    def run(self, requests: Sequence[BenchRequest], batch_size: int) -> RunResult:
        if not self._warm:
            self._batch([BenchRequest(list(requests[0].prompt_token_ids[:16]), 2)])
            self._warm = True
        start = time.perf_counter()
        lens: list[int] = []
        for i in range(0, len(requests), batch_size):
            lens += self._batch(requests[i : i + batch_size])
        return time.perf_counter() - start, lens


class HFStatic:
    """One batch size of a loaded :class:`HFStaticEngine` (the model is shared)."""

    name = NAME

    def __init__(self, engine: HFStaticEngine, batch_size: int) -> None:
        self.engine, self.batch_size = engine, batch_size

    def unavailable(self) -> str | None:
        return None  # the engine loaded, or it raised

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        return self.engine.run(requests, self.batch_size)
