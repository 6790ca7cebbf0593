"""The flags of ``convoy bench throughput``, ``latency`` and ``serve``.

Beside convoy's own flags, the ones ``vllm bench`` uses for the same thing are accepted
(``--input-len``, ``--random-range-ratio``, ``--dataset-name``, ``--save-result`` ...), so a
command line written for vLLM runs here too; :mod:`convoy.bench.args` gives them vLLM's
meaning. No parser abbreviates flags: ``--input-len`` must never be read as a prefix of
``--input-len-min``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from convoy.cli_args import add_dataclass_arguments
from convoy.config import CONFIG_CLASSES

__all__ = ["DATASETS", "add_bench_parser"]

# The workloads --dataset names; vLLM's "custom" (a JSONL file of prompts) is convoy's jsonl.
DATASETS = ("random", "shared-prefix", "jsonl")
_DATASET_ALIASES = {"custom": "jsonl"}


def add_bench_parser(sub: Any) -> None:
    """Add ``bench`` (``throughput``, ``latency``, ``serve``) to the ``convoy`` subparsers."""
    bench = sub.add_parser(
        "bench",
        help="measure throughput and latency",
        description="Benchmark the engine on synthetic or given workloads.",
        allow_abbrev=False,
    )
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    _add_throughput_parser(kinds)
    _add_latency_parser(kinds)
    _add_serve_parser(kinds)


def _add_throughput_parser(kinds: Any) -> None:
    tp = kinds.add_parser(
        "throughput",
        help="offline throughput of a whole workload",
        description="Submit every request of a workload at once and time the run. Output "
        "lengths are exact: EOS is ignored.",
        allow_abbrev=False,
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
        help="time each step's phases, print the breakdown and write every step's timing "
        "here as JSON",
    )
    _add_engine_run_args(tp)


def _add_latency_parser(kinds: Any) -> None:
    lat = kinds.add_parser(
        "latency",
        help="prefill and decode speed of one fixed batch",
        description="Run a batch of equal random prompts several times; report median "
        "prefill tokens/s and decode tokens/s.",
        allow_abbrev=False,
    )
    g = lat.add_argument_group("batch")
    g.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, required=True, help="output tokens per request")
    g.add_argument("--batch-size", type=int, required=True, help="requests in the batch")
    g.add_argument("--num-iters", type=int, default=3, help="timed iterations (median reported)")
    g.add_argument(
        "--num-warmup",
        "--num-iters-warmup",
        dest="num_warmup",
        type=int,
        default=1,
        help="untimed iterations first (default: 1)",
    )
    g.add_argument("--dataset-seed", type=int, default=0, help="seed of the random prompts")
    _add_engine_run_args(lat)


def _add_serve_parser(kinds: Any) -> None:
    sv = kinds.add_parser(
        "serve",
        help="online load test of a running OpenAI-compatible server",
        description="Stream /v1/completions requests to a running OpenAI-compatible server "
        "(convoy, vLLM, llama.cpp's server, llama-cpp-python) on a Poisson or gamma arrival "
        "process; report TTFT, TPOT, ITL, end-to-end latency, throughput and goodput. "
        "Requests carry ignore_eos, which not every server honours, so the report counts "
        "the tokens each request really got.",
        allow_abbrev=False,
    )
    _add_server_args(sv.add_argument_group("server"))
    _add_arrival_args(sv.add_argument_group("arrivals"))
    _add_workload_args(sv)
    o = sv.add_argument_group("run")
    o.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    o.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        help="service-level objectives in ms (ttft, tpot, e2el; e.g. ttft:500 tpot:50); "
        "goodput is the rate of requests meeting all of them",
    )
    o.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send one short untimed request first, which also checks the server accepts "
        "the requests (default: on)",
    )
    _add_result_args(o)


def _add_server_args(g: argparse._ArgumentGroup) -> None:
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
        help="Hugging Face tokenizer (path or id) for random prompts and text prompts "
        "(default: the served model's directory, or convoy's default model's)",
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


def _add_arrival_args(a: argparse._ArgumentGroup) -> None:
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
        help="shape of the gamma-distributed gaps between requests: 1 is a Poisson process, "
        "below 1 burstier, above 1 more regular (default: 1)",
    )
    a.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight at once"
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the arrival process")


def _dataset(name: str) -> str:
    return _DATASET_ALIASES.get(name, name)


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload flags ``throughput`` and ``serve`` share."""
    w = parser.add_argument_group("workload")
    w.add_argument(
        "--dataset",
        "--dataset-name",
        dest="dataset",
        type=_dataset,
        choices=DATASETS,
        default="random",
        metavar="NAME",
        help="workload: random (default), shared-prefix or jsonl (vLLM's custom)",
    )
    w.add_argument("--num-prompts", type=int, default=64, help="requests (random, shared-prefix)")
    w.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        type=int,
        help="random: prompt length, varied by --random-range-ratio (vLLM's meaning)",
    )
    w.add_argument("--input-len-min", type=int, help="random: shortest prompt (default: 64)")
    w.add_argument("--input-len-max", type=int, help="random: longest prompt (default: 256)")
    w.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        help="random: as --input-len, for outputs; shared-prefix: output length (default: "
        "64); jsonl: for lines without output_len",
    )
    w.add_argument("--output-len-min", type=int, help="random: shortest output (default: 32)")
    w.add_argument("--output-len-max", type=int, help="random: longest output (default: 128)")
    w.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random: r in [0, 1); lengths are uniform in [L*(1-r), L*(1+r)] around "
        "--input-len and --output-len (default: 0, exact lengths)",
    )
    w.add_argument(
        "--num-groups", type=int, default=4, help="shared-prefix: groups (num-prompts split evenly)"
    )
    w.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: shared tokens")
    w.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: own tokens")
    w.add_argument("--dataset-path", type=Path, help="jsonl: file of prompts")
    w.add_argument("--dataset-seed", type=int, default=0, help="seed of the random workloads")
    w.add_argument("--save-workload", type=Path, help="write the workload's token ids here (JSONL)")


def _add_result_args(o: argparse._ArgumentGroup) -> None:
    """Where the JSON result goes: convoy's ``--json`` or vLLM's names for it."""
    o.add_argument(
        "--json",
        "--output-json",
        dest="json",
        type=Path,
        metavar="OUT",
        help="write the full result here",
    )
    o.add_argument(
        "--save-result",
        action="store_true",
        help="write the full result to --result-dir/--result-filename "
        "(default: ./convoy-COMMAND-TIME.json)",
    )
    o.add_argument("--result-dir", type=Path, help="directory of --save-result (default: .)")
    o.add_argument("--result-filename", help="file name of --save-result (implies it)")


def _add_engine_run_args(parser: argparse.ArgumentParser) -> None:
    """The run and engine flags ``throughput`` and ``latency`` share."""
    o = parser.add_argument_group("run")
    o.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    _add_result_args(o)
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
