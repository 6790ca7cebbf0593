"""Latency of one fixed batch: prefill tokens/s and decode tokens/s, median of several runs."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from convoy.bench.metrics import LatencyResult, RequestTiming, compute_latency
from convoy.bench.throughput import bench_sampling_params, timings_from_outputs
from convoy.bench.workloads import BenchRequest, random_workload

if TYPE_CHECKING:
    from convoy.entrypoints.llm import LLM

__all__ = ["latency_batch", "run_latency"]


def latency_batch(
    input_len: int,
    output_len: int,
    batch_size: int,
    vocab_size: int,
    seed: int,
    avoid_ids: Collection[int] = (),
) -> list[BenchRequest]:
    """``batch_size`` random prompts of exactly ``input_len`` tokens, ``output_len`` each."""
    return random_workload(
        batch_size, (input_len, input_len), (output_len, output_len), vocab_size, seed, avoid_ids
    )


def run_latency(
    llm: LLM,
    input_len: int,
    output_len: int,
    batch_size: int,
    vocab_size: int,
    avoid_ids: Collection[int] = (),
    num_iters: int = 3,
    num_warmup: int = 1,
    seed: int = 0,
    temperature: float = 0.0,
    use_tqdm: bool = True,
) -> LatencyResult:
    """Submit a batch of ``batch_size`` requests at once, ``num_warmup + num_iters`` times,
    and time the prefill and decode phases of the last ``num_iters`` (see
    :class:`~convoy.bench.metrics.LatencyResult`).

    Each iteration gets fresh prompts (seed ``seed + i``), so an engine that caches
    prefixes cannot skip the prefill of a repeated batch.
    """
    if num_iters < 1 or num_warmup < 0:
        raise ValueError("num_iters must be >= 1 and num_warmup >= 0")
    iterations: list[list[RequestTiming]] = []
    total = num_warmup + num_iters
    bar = _progress(total) if use_tqdm else None
    try:
        for i in range(total):
            batch = latency_batch(
                input_len, output_len, batch_size, vocab_size, seed + i, avoid_ids
            )
            outputs = llm.generate(
                [r.prompt_token_ids for r in batch],
                bench_sampling_params(output_len, temperature),
                use_tqdm=False,
            )
            if i >= num_warmup:
                iterations.append(timings_from_outputs(outputs))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return compute_latency(iterations, batch_size, input_len, output_len)


def _progress(total: int) -> Any:
    return tqdm(total=total, desc="latency iterations", unit="it", dynamic_ncols=True)
