"""``convoy bench throughput``, ``latency`` and ``serve``: parsers, runs and reports.

The JSON report (``--json OUT``) is meant to be read back by a harness that runs the same
workload on other engines, so it carries everything needed to rebuild and score the run
without convoy: the workload's recipe (or, with ``--save-workload``, its exact token ids),
the model's shape for the roofline, the machine, and the result in plain numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convoy.bench import roofline
from convoy.bench.memory import memory_report
from convoy.bench.metrics import (
    LatencyResult,
    RequestTiming,
    ThroughputResult,
    e2e_latency,
    render_table,
    tpot,
    ttft,
)
from convoy.bench.workloads import (
    BenchRequest,
    jsonl_workload,
    random_workload,
    save_jsonl,
    shared_prefix_workload,
)
from convoy.cli import add_dataclass_arguments, pick_fields
from convoy.config import CONFIG_CLASSES

if TYPE_CHECKING:
    from convoy.entrypoints.llm import LLM

__all__ = ["add_bench_parser", "run_bench", "token_space", "workload_from_args"]

# Report format version: bump when a key changes meaning, so readers can refuse old files.
REPORT_VERSION = 1


def add_bench_parser(sub: Any) -> None:
    """Add ``bench`` (``throughput``, ``latency``, ``serve``) to the ``convoy`` subparsers."""
    bench = sub.add_parser(
        "bench",
        help="measure throughput and latency",
        description="Benchmark the engine on synthetic or given workloads.",
    )
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    tp = kinds.add_parser(
        "throughput",
        help="offline throughput of a whole workload",
        description="Submit every request of a workload at once and time the run. Output "
        "lengths are exact: EOS is ignored.",
    )
    _add_workload_args(tp)
    tp.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run one short untimed request first (default: on)",
    )
    tp.add_argument(
        "--profile",
        type=Path,
        metavar="OUT",
        help="time each step's phases (schedule, prepare, forward, logits, sample, process), "
        "print the breakdown and write every step's timing here as JSON",
    )
    _add_common(tp)

    lat = kinds.add_parser(
        "latency",
        help="prefill and decode speed of one fixed batch",
        description="Run a batch of equal random prompts several times; report median "
        "prefill tokens/s and decode tokens/s.",
    )
    g = lat.add_argument_group("batch")
    g.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, required=True, help="output tokens per request")
    g.add_argument("--batch-size", type=int, required=True, help="requests in the batch")
    g.add_argument("--num-iters", type=int, default=3, help="timed iterations (median reported)")
    g.add_argument("--num-warmup", type=int, default=1, help="untimed iterations first")
    g.add_argument("--dataset-seed", type=int, default=0, help="seed of the random prompts")
    _add_common(lat)

    sv = kinds.add_parser(
        "serve",
        help="online load test of a running OpenAI-compatible server",
        description="Stream /v1/completions requests to a running OpenAI-compatible server "
        "(convoy, vLLM, llama.cpp's server, llama-cpp-python) on a Poisson or gamma arrival "
        "process; report TTFT, TPOT, ITL, end-to-end latency, throughput and goodput. "
        "Requests carry ignore_eos (honoured by vLLM, convoy and llama.cpp's llama-server, not "
        "by llama-cpp-python): output lengths are exact only on servers that honour it, so the "
        "report counts the tokens each request really got.",
    )
    g = sv.add_argument_group("server")
    g.add_argument(
        "--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (no /v1)"
    )
    g.add_argument("--model", help="model name to request (default: first id of GET /v1/models)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)",
    )
    g.add_argument(
        "--prompt-format",
        choices=("ids", "text"),
        default="ids",
        help="send prompts as token-id lists (default; convoy and vLLM accept them) or as "
        "text decoded with --tokenizer (for servers that take only strings)",
    )
    g.add_argument(
        "--tokenizer",
        help="Hugging Face tokenizer (path or id) for random prompts' token space and for "
        "decoding text prompts (default: the served model if it is a local directory, or "
        "convoy's default model if the server serves that)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a request may take, end to end, before it counts as failed (default: 300)",
    )
    g.add_argument(
        "--extra-body",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="JSON object merged into every request body (server-specific fields)",
    )
    a = sv.add_argument_group("arrivals")
    a.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="mean requests per second (default: inf, every request at once)",
    )
    a.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="shape of the gamma-distributed inter-arrival times: 1 is a Poisson process, "
        "below 1 burstier, above 1 more regular (default: 1)",
    )
    a.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight at once"
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    _add_workload_args(sv)
    o = sv.add_argument_group("run")
    o.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    o.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        help="service-level objectives (ttft, tpot, e2el in ms, e.g. ttft:500 tpot:50): "
        "goodput is the rate of requests meeting all of them",
    )
    o.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send one short untimed request first, which also checks the server accepts "
        "the requests (default: on)",
    )
    o.add_argument("--json", type=Path, metavar="OUT", help="write the full result here")


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload flags ``throughput`` and ``serve`` share."""
    w = parser.add_argument_group("workload")
    w.add_argument(
        "--dataset", choices=("random", "shared-prefix", "jsonl"), default="random", help="workload"
    )
    w.add_argument("--num-prompts", type=int, default=64, help="requests (random, shared-prefix)")
    w.add_argument("--input-len-min", type=int, default=64, help="random: shortest prompt")
    w.add_argument("--input-len-max", type=int, default=256, help="random: longest prompt")
    w.add_argument("--output-len-min", type=int, default=32, help="random: shortest output")
    w.add_argument("--output-len-max", type=int, default=128, help="random: longest output")
    w.add_argument(
        "--num-groups", type=int, default=4, help="shared-prefix: groups (num-prompts split evenly)"
    )
    w.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: shared tokens")
    w.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: own tokens")
    w.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="shared-prefix: output length (default 64); jsonl: for lines without output_len",
    )
    w.add_argument("--dataset-path", type=Path, help="jsonl: file of prompts")
    w.add_argument("--dataset-seed", type=int, default=0, help="seed of the random workloads")
    w.add_argument("--save-workload", type=Path, help="write the workload's token ids here (JSONL)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    o = parser.add_argument_group("run")
    o.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    o.add_argument("--json", type=Path, metavar="OUT", help="write the full result here")
    o.add_argument(
        "--roofline",
        action="store_true",
        help="also measure this machine's bandwidth and matmul peak and report the bound",
    )
    o.add_argument(
        "--roofline-size-mb",
        type=int,
        default=512,
        help="size of the tensor copied to measure bandwidth (default: 512)",
    )
    for cls in CONFIG_CLASSES:
        add_dataclass_arguments(parser.add_argument_group(cls.__name__), cls)


def run_bench(args: argparse.Namespace) -> int:
    """Run the parsed ``convoy bench`` command; returns the exit status."""
    name = f"convoy bench {args.bench_command}"
    if args.bench_command == "serve":
        from convoy.bench.serve import run_serve

        return run_serve(args, name)
    from convoy import LLM

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


def token_space(tok: Any, model_vocab_size: int | None) -> tuple[int, list[int]]:
    """(vocabulary size random prompts draw from, special ids they avoid) of a Hugging Face
    tokenizer ``tok`` for a model with ``model_vocab_size`` embedding rows (``None``: unknown,
    use the tokenizer's size)."""
    # Ids past the tokenizer's vocabulary (padded embedding rows) would not decode.
    vocab = len(tok) if model_vocab_size is None else min(model_vocab_size, len(tok))
    # all_special_ids lists only the named ones (BOS, EOS, PAD...); chat markers such as
    # <|im_start|> are special added tokens that only added_tokens_decoder knows about.
    special = set(tok.all_special_ids)
    special.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    return vocab, sorted(int(i) for i in special)


def _workload(llm: LLM, args: argparse.Namespace) -> tuple[list[BenchRequest], dict[str, Any]]:
    """The requests and the recipe that rebuilds them (for the report)."""
    return workload_from_args(args, llm.get_tokenizer(), llm.engine.arch.vocab_size)


def workload_from_args(
    args: argparse.Namespace, tokenizer: Any | None, model_vocab_size: int | None
) -> tuple[list[BenchRequest], dict[str, Any]]:
    """The requests the workload flags describe, and the recipe that rebuilds them.

    ``tokenizer`` (a Hugging Face tokenizer) gives the token space of random prompts and
    encodes JSONL text prompts; it may be ``None`` only for a JSONL file of token ids.
    """
    vocab: int = 0
    avoid: list[int] = []
    if tokenizer is None:
        if args.dataset != "jsonl":
            raise ValueError(f"--dataset {args.dataset} needs a tokenizer")
    else:
        vocab, avoid = token_space(tokenizer, model_vocab_size)
    common = {"vocab_size": vocab, "avoid_ids": avoid, "seed": args.dataset_seed}
    if args.dataset == "random":
        spec: dict[str, Any] = {
            "dataset": "random",
            "num_prompts": args.num_prompts,
            "input_len_range": [args.input_len_min, args.input_len_max],
            "output_len_range": [args.output_len_min, args.output_len_max],
            **common,
        }
        requests = random_workload(
            args.num_prompts,
            (args.input_len_min, args.input_len_max),
            (args.output_len_min, args.output_len_max),
            vocab,
            args.dataset_seed,
            avoid,
        )
    elif args.dataset == "shared-prefix":
        per_group = args.num_prompts // max(args.num_groups, 1)
        if args.num_groups < 1 or per_group < 1:
            raise ValueError(
                f"--num-prompts {args.num_prompts} over --num-groups {args.num_groups} "
                "leaves no request per group"
            )
        output_len = 64 if args.output_len is None else args.output_len
        spec = {
            "dataset": "shared-prefix",
            "num_groups": args.num_groups,
            "prefix_len": args.prefix_len,
            "suffix_len": args.suffix_len,
            "requests_per_group": per_group,
            "output_len": output_len,
            **common,
        }
        requests = shared_prefix_workload(
            args.num_groups,
            args.prefix_len,
            args.suffix_len,
            per_group,
            output_len,
            vocab,
            args.dataset_seed,
            avoid,
        )
    else:
        if args.dataset_path is None:
            raise ValueError("--dataset jsonl needs --dataset-path")
        spec = {"dataset": "jsonl", "path": str(args.dataset_path), "output_len": args.output_len}
        requests = jsonl_workload(args.dataset_path, tokenizer, args.output_len)
    if not requests:
        raise ValueError("the workload has no requests")
    return requests, spec


def _throughput(llm: LLM, args: argparse.Namespace, name: str) -> int:
    from convoy.bench.throughput import run_throughput

    requests, spec = _workload(llm, args)
    if args.save_workload is not None:
        save_jsonl(requests, args.save_workload)
        spec["saved_to"] = str(args.save_workload)
    spec["num_requests"] = len(requests)
    steps_before = llm.engine.num_steps
    result, timings = run_throughput(
        llm, requests, args.temperature, warmup=args.warmup, profile=args.profile is not None
    )
    engine_steps = llm.engine.num_steps - steps_before

    print(result.format_table(f"convoy throughput ({spec['dataset']})"))
    profile = llm.engine.profiler if args.profile is not None else None
    if args.profile is not None and profile is not None:
        print(profile.format_table())
        profile.write(args.profile)
    memory = memory_report(llm)
    print(memory.format_table())
    roof: dict[str, Any] | None = None
    if args.roofline:
        roof, table = _throughput_roofline(llm, requests, result, args.roofline_size_mb)
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
    from convoy.bench.latency import run_latency

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
        roof, table = _latency_roofline(llm, result, args.roofline_size_mb)
        print(table)
    report = {
        **_report_header("latency", llm, args.temperature),
        "workload": {
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
        },
        "result": result.to_dict(),
        "roofline": roof,
    }
    _write_report(args.json, report)
    return _check_exact(name, result.output_lengths_exact, result.num_mismatched_outputs)


# -- roofline ----------------------------------------------------------------------------------


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


def _throughput_roofline(
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


def _latency_roofline(llm: LLM, result: LatencyResult, size_mb: int) -> tuple[dict[str, Any], str]:
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


# -- report ------------------------------------------------------------------------------------


def _report_header(kind: str, llm: LLM, temperature: float) -> dict[str, Any]:
    import torch

    import convoy

    engine = llm.engine
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if engine.runner.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(engine.runner.device)
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
        "machine": machine,
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
