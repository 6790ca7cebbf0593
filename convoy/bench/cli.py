"""``convoy bench throughput``, ``latency`` and ``serve``: runs and reports.

The JSON report (``--json OUT``) is meant to be read back by a harness that runs the same
workload on other engines, so it carries everything needed to rebuild and score the run
without convoy: the workload's recipe (or, with ``--save-workload``, its exact token ids),
the model's shape for the roofline, the machine, and the result in plain numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import convoy
from convoy.bench.args import result_path, token_space, workload_from_args
from convoy.bench.latency import run_latency
from convoy.bench.memory import memory_report
from convoy.bench.metrics import RequestTiming, e2e_latency, tpot, ttft
from convoy.bench.roofline_report import latency_roofline, throughput_roofline
from convoy.bench.serve import run_serve
from convoy.bench.throughput import run_throughput
from convoy.bench.workloads import BenchRequest, save_jsonl
from convoy.cli_args import pick_fields
from convoy.config import CONFIG_CLASSES
from convoy.engine.profiler import StepProfiler
from convoy.entrypoints.llm import LLM

__all__ = ["REPORT_VERSION", "run_bench"]

# Report format version: bump when a key changes meaning, so readers can refuse old files.
REPORT_VERSION = 1


def run_bench(args: argparse.Namespace) -> int:
    """Run the parsed ``convoy bench`` command; returns the exit status."""
    name = f"convoy bench {args.bench_command}"
    try:
        # Decided once here: --json, or vLLM's --save-result and its file name flags.
        args.json = result_path(args)
    except ValueError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    if args.bench_command == "serve":
        return run_serve(args, name)
    engine_kwargs: dict[str, Any] = {}
    for cls in CONFIG_CLASSES:
        engine_kwargs.update(pick_fields(args, cls))
    try:
        llm = LLM(**engine_kwargs)
        if args.bench_command == "throughput":
            return _throughput(llm, args, name)
        return _latency(llm, args, name)
    except ValueError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2


# -- throughput --------------------------------------------------------------------------------


def _token_space(llm: LLM) -> tuple[int, list[int]]:
    """(vocabulary size random prompts draw from, special ids they avoid)."""
    return token_space(llm.get_tokenizer(), llm.engine.arch.vocab_size)


def _workload(llm: LLM, args: argparse.Namespace) -> tuple[list[BenchRequest], dict[str, Any]]:
    """The requests and the recipe that rebuilds them (for the report), saved if asked."""
    requests, spec = workload_from_args(args, llm.get_tokenizer(), llm.engine.arch.vocab_size)
    if args.save_workload is not None:
        save_jsonl(requests, args.save_workload)
        spec["saved_to"] = str(args.save_workload)
    spec["num_requests"] = len(requests)
    return requests, spec


def _profile_report(llm: LLM, out: Path | None) -> StepProfiler | None:
    """Print and write the step profile of a run made with ``--profile OUT``."""
    profile = llm.engine.profiler if out is not None else None
    if out is not None and profile is not None:
        print(profile.format_table())
        profile.write(out)
    return profile


def _throughput(llm: LLM, args: argparse.Namespace, name: str) -> int:
    requests, spec = _workload(llm, args)
    steps_before = llm.engine.num_steps
    result, timings = run_throughput(
        llm, requests, args.temperature, warmup=args.warmup, profile=args.profile is not None
    )
    engine_steps = llm.engine.num_steps - steps_before

    print(result.format_table(f"convoy throughput ({spec['dataset']})"))
    profile = _profile_report(llm, args.profile)
    memory = memory_report(llm)
    print(memory.format_table())
    roof: dict[str, Any] | None = None
    if args.roofline:
        roof, table = throughput_roofline(llm, requests, result, args.roofline_size_mb)
        print(table)
    report = {
        **_report_header("throughput", llm, args.temperature),
        "workload": spec,
        "result": result.to_dict(),
        "engine_steps": engine_steps,
        "requests": [_request_record(r, t) for r, t in zip(requests, timings, strict=True)],
        "roofline": roof,
        "profile": profile.summary() if profile is not None else None,
        "memory": memory.to_dict(),
    }
    _write_report(args.json, report)
    return _check_exact(name, result.output_lengths_exact, result.num_mismatched_outputs)


def _request_record(request: BenchRequest, timing: RequestTiming) -> dict[str, Any]:
    t = tpot(timing)
    return {
        "input_len": request.input_len,
        "output_len": request.output_len,
        "num_output_tokens": timing.num_output_tokens,
        "ttft_ms": ttft(timing) * 1e3,
        "tpot_ms": None if t is None else t * 1e3,
        "e2e_latency_ms": e2e_latency(timing) * 1e3,
    }


# -- latency -----------------------------------------------------------------------------------


def _latency(llm: LLM, args: argparse.Namespace, name: str) -> int:
    if min(args.input_len, args.output_len, args.batch_size) < 1:
        raise ValueError("--input-len, --output-len and --batch-size must be >= 1")
    vocab, avoid = _token_space(llm)
    result = run_latency(
        llm,
        args.input_len,
        args.output_len,
        args.batch_size,
        vocab,
        avoid,
        num_iters=args.num_iters,
        num_warmup=args.num_warmup,
        seed=args.dataset_seed,
        temperature=args.temperature,
    )
    print(result.format_table("convoy latency"))
    roof: dict[str, Any] | None = None
    if args.roofline:
        roof, table = latency_roofline(llm, result, args.roofline_size_mb)
        print(table)
    report = {
        **_report_header("latency", llm, args.temperature),
        "workload": _latency_workload(args, vocab, avoid),
        "result": result.to_dict(),
        "roofline": roof,
    }
    _write_report(args.json, report)
    return _check_exact(name, result.output_lengths_exact, result.num_mismatched_outputs)


def _latency_workload(args: argparse.Namespace, vocab: int, avoid: list[int]) -> dict[str, Any]:
    return {
        "dataset": "latency",
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "num_warmup": args.num_warmup,
        # Iteration i (warm-ups included) is random_workload(batch_size, (I, I), (O, O),
        # vocab_size, seed + i, avoid_ids).
        "vocab_size": vocab,
        "avoid_ids": avoid,
        "seed": args.dataset_seed,
    }


# -- report ------------------------------------------------------------------------------------


def _machine(llm: LLM) -> dict[str, Any]:
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if llm.engine.runner.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(llm.engine.runner.device)
    return machine


def _report_header(kind: str, llm: LLM, temperature: float) -> dict[str, Any]:
    engine = llm.engine
    return {
        "report_version": REPORT_VERSION,
        "benchmark": kind,
        "engine": "convoy",
        "engine_version": convoy.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": str(engine.model_path),
        "architecture": engine.arch.architecture,
        "device": str(engine.runner.device),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "max_model_len": engine.max_model_len,
        "engine_config": dataclasses.asdict(engine.config),
        "sampling": {"temperature": temperature, "ignore_eos": True},
        "machine": _machine(llm),
    }


def _write_report(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _check_exact(name: str, exact: bool, mismatched: int) -> int:
    if exact:
        return 0
    # With EOS ignored every output has exactly the asked length; anything else means some
    # requests failed or the engine stopped early, and the rates above compare unequal work.
    print(f"{name}: {mismatched} request(s) did not produce the requested length", file=sys.stderr)
    return 1
