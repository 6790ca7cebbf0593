"""The roofline section of a ``convoy bench throughput`` or ``latency`` report: this
machine's measured peaks, the bound :mod:`convoy.bench.roofline` derives from them for the
run's schedule, and the fraction of it the run achieved."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from convoy.bench import roofline
from convoy.bench.metrics import LatencyResult, ThroughputResult, render_table
from convoy.bench.workloads import BenchRequest
from convoy.entrypoints.llm import LLM

__all__ = ["latency_roofline", "throughput_roofline"]


def _machine_peaks(llm: LLM, size_mb: int) -> dict[str, Any]:
    """Measure bandwidth and matmul peak on the engine's device, in the engine's dtype."""
    runner = llm.engine.runner
    bandwidth = roofline.measure_memory_bandwidth(size_mb, device=runner.device)
    peak = roofline.measure_matmul_flops(device=runner.device, dtype=runner.dtype)
    return {
        "device": str(runner.device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "dtype_bytes": runner.dtype.itemsize,
        "bandwidth_gbs": bandwidth,
        "peak_gflops": peak,
    }


def _schedule_bound(
    llm: LLM, peaks: dict[str, Any], lens: Sequence[tuple[int, int]]
) -> tuple[roofline.ModelShape, roofline.ScheduleBound]:
    shape = roofline.ModelShape.from_arch(llm.engine.arch)
    sched = llm.engine.config.scheduler
    bound = roofline.schedule_bound(
        shape,
        peaks["dtype_bytes"],
        lens,
        peaks["bandwidth_gbs"],
        peaks["peak_gflops"],
        sched.max_num_seqs,
        sched.max_num_batched_tokens,
    )
    return shape, bound


def _peak_rows(shape: roofline.ModelShape, peaks: dict[str, Any]) -> list[tuple[str, str]]:
    per_step = roofline.weight_bytes_per_step(shape, peaks["dtype_bytes"])
    return [
        ("Memory bandwidth (GB/s)", f"{peaks['bandwidth_gbs']:.1f}"),
        (f"Matmul peak ({peaks['dtype']}, GFLOP/s)", f"{peaks['peak_gflops']:.1f}"),
        ("Parameters", f"{shape.num_params:,}"),
        ("Weights read per step (MB)", f"{per_step / 1e6:.1f}"),
    ]


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}% of bound"


def throughput_roofline(
    llm: LLM, requests: Sequence[BenchRequest], result: ThroughputResult, size_mb: int
) -> tuple[dict[str, Any], str]:
    """(report section, printed table) of the roofline of a throughput run."""
    peaks = _machine_peaks(llm, size_mb)
    lens = [(r.input_len, r.output_len) for r in requests]
    shape, bound = _schedule_bound(llm, peaks, lens)
    total_tokens = result.num_input_tokens + result.num_output_tokens
    # Same tokens in both, so the ratio of times is the ratio of rates.
    fraction = bound.total_s / result.elapsed_s
    rows = [
        *_peak_rows(shape, peaks),
        ("Bound: steps (memory-bound)", f"{bound.num_steps} ({bound.num_memory_bound_steps})"),
        ("Bound: elapsed (s)", f"{bound.total_s:.3f}"),
        ("Bound: output tokens/s", f"{result.num_output_tokens / bound.total_s:.1f}"),
        ("Bound: total tokens/s", f"{total_tokens / bound.total_s:.1f}"),
        ("convoy achieves", _pct(fraction)),
    ]
    section = {
        **peaks,
        "model_shape": dataclasses.asdict(shape),
        "bound": dataclasses.asdict(bound),
        "bound_output_tokens_per_s": result.num_output_tokens / bound.total_s,
        "bound_total_tokens_per_s": total_tokens / bound.total_s,
        "achieved_fraction": fraction,
    }
    return section, render_table("Roofline", rows)


def latency_roofline(llm: LLM, result: LatencyResult, size_mb: int) -> tuple[dict[str, Any], str]:
    """(report section, printed table) of the roofline of a latency run."""
    peaks = _machine_peaks(llm, size_mb)
    b, i, o = result.batch_size, result.input_len, result.output_len
    shape, bound = _schedule_bound(llm, peaks, [(i, o)] * b)
    prefill_tps = b * i / bound.prefill_s
    fractions: dict[str, float] = {"prefill": result.median_prefill_tokens_per_s / prefill_tps}
    section: dict[str, Any] = {
        **peaks,
        "model_shape": dataclasses.asdict(shape),
        "bound": dataclasses.asdict(bound),
        "bound_prefill_tokens_per_s": prefill_tps,
        "bound_decode_tokens_per_s": None,
        "achieved_fraction": fractions,
    }
    rows = [
        *_peak_rows(shape, peaks),
        ("Bound: prefill tokens/s", f"{prefill_tps:.1f}"),
        ("convoy prefill achieves", _pct(fractions["prefill"])),
    ]
    if result.median_decode_tokens_per_s is not None and bound.decode_s > 0:
        decode_tps = b * (o - 1) / bound.decode_s
        fractions["decode"] = result.median_decode_tokens_per_s / decode_tps
        section["bound_decode_tokens_per_s"] = decode_tps
        rows += [
            ("Bound: decode tokens/s", f"{decode_tps:.1f}"),
            ("convoy decode achieves", _pct(fractions["decode"])),
        ]
    return section, render_table("Roofline", rows)
