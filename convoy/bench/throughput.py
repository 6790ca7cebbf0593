"""Offline throughput: run a whole workload through :class:`convoy.LLM` and time it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from convoy.bench.metrics import RequestTiming, ThroughputResult, compute_throughput
from convoy.bench.workloads import BenchRequest
from convoy.engine.profiler import StepProfiler
from convoy.sampling_params import SamplingParams

if TYPE_CHECKING:
    from convoy.entrypoints.llm import LLM
    from convoy.outputs import RequestOutput

__all__ = ["bench_sampling_params", "run_throughput", "timings_from_outputs"]


def bench_sampling_params(output_len: int, temperature: float = 0.0) -> SamplingParams:
    """Parameters that make a request generate exactly ``output_len`` tokens.

    EOS is ignored so every engine does the same amount of work whatever the model (a random
    model emits EOS at random); greedy by default, so runs are repeatable.
    """
    return SamplingParams(max_tokens=output_len, temperature=temperature, ignore_eos=True)


def timings_from_outputs(outputs: Sequence[RequestOutput]) -> list[RequestTiming]:
    """One :class:`RequestTiming` per finished output (its first completion's tokens).

    Raises ``RuntimeError`` for a request that never produced a token (it failed), as its
    latencies do not exist.
    """
    timings = []
    for i, out in enumerate(outputs):
        m = out.metrics
        if m.first_token_time is None or m.finish_time is None:
            reasons = [c.finish_reason for c in out.outputs]
            raise RuntimeError(f"request {i} produced no token (finish reasons: {reasons})")
        timings.append(
            RequestTiming(
                arrival_time=m.arrival_time,
                first_token_time=m.first_token_time,
                finish_time=m.finish_time,
                num_input_tokens=len(out.prompt_token_ids),
                num_output_tokens=len(out.outputs[0].token_ids),
            )
        )
    return timings


def warm_up(llm: LLM, requests: Sequence[BenchRequest]) -> None:
    """Run one short request first, untimed: the first forward pays one-off costs (torch
    kernel selection, allocator growth, CUDA context) that are no part of serving."""
    if requests:
        prompt = requests[0].prompt_token_ids[:16]
        llm.generate([prompt], bench_sampling_params(2), use_tqdm=False)


def run_throughput(
    llm: LLM,
    requests: Sequence[BenchRequest],
    temperature: float = 0.0,
    use_tqdm: bool = True,
    warmup: bool = True,
    profile: bool = False,
) -> tuple[ThroughputResult, list[RequestTiming]]:
    """Generate for every request at once and time the run.

    Returns the aggregate result and each request's timing (in workload order). The output
    lengths are checked against the requested ones: ``result.num_mismatched_outputs`` counts
    the requests that differ. The prefix cache is emptied before the clock starts (sharing
    within the run still counts). ``profile``: time every step of the run (not the warm-up)
    into a fresh ``llm.engine.profiler``.
    """
    if not requests:
        raise ValueError("the workload is empty")
    if warmup:
        warm_up(llm, requests)
    # Every timed run starts with an empty prefix cache, as a fresh process would: a workload
    # repeated on one engine must not find its own prompts cached from the previous run.
    llm.reset_prefix_cache()
    prompts = [list(r.prompt_token_ids) for r in requests]
    params = [bench_sampling_params(r.output_len, temperature) for r in requests]
    if profile:
        llm.engine.profiler = StepProfiler()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    timings = timings_from_outputs(outputs)
    result = compute_throughput(timings, elapsed, [r.output_len for r in requests])
    return result, timings
