"""``convoy bench serve``: an online load generator for any OpenAI-compatible server.

This module is the command: it finds the served model and its tokenizer, builds the
workload, runs it and writes the report. The parts live beside it:

* :mod:`convoy.bench.serve_client`: the arrival process and the requests it sends;
* :mod:`convoy.bench.serve_request`: one streamed request, timed chunk by chunk;
* :mod:`convoy.bench.sse`: the Server-Sent Events those streams are made of;
* :mod:`convoy.bench.serve_result`: the aggregate (TTFT, TPOT, ITL, throughput, goodput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from convoy.bench.args import workload_from_args
from convoy.bench.serve_client import (
    ServeConfig,
    arrival_offsets,
    get_models,
    run_requests,
    warm_up,
)
from convoy.bench.serve_request import RequestRecord, send_request
from convoy.bench.serve_result import (
    GOODPUT_METRICS,
    ServeResult,
    compute_serve_result,
    meets_slos,
    parse_goodput,
)
from convoy.bench.sse import SSEDecoder, StreamChunk, iter_sse_data, parse_chunk
from convoy.bench.workloads import BenchRequest, save_jsonl
from convoy.checkpoints import DEFAULT_MODEL_NAME, default_model_path

__all__ = [
    "GOODPUT_METRICS",
    "RequestRecord",
    "SSEDecoder",
    "ServeConfig",
    "ServeResult",
    "StreamChunk",
    "arrival_offsets",
    "compute_serve_result",
    "iter_sse_data",
    "meets_slos",
    "parse_chunk",
    "parse_goodput",
    "run_serve",
    "send_request",
]

REPORT_VERSION = 1


@dataclass(frozen=True)
class _Setup:
    """Everything a run needs before its first request: the server's models, the one it
    asks for, the tokenizer it used, and the workload as requests, recipe and prompts."""

    models: list[dict[str, Any]]
    model: str
    tokenizer_source: str | None
    requests: list[BenchRequest]
    spec: dict[str, Any]
    prompts: list[str | list[int]]
    slos: dict[str, float]


def _tokenizer_source(tokenizer: str | None, model: str) -> str | None:
    """The tokenizer to load: ``--tokenizer``, the served model if it is a local directory,
    convoy's default model if that is what is served; ``None`` if none of these."""
    if tokenizer:
        return tokenizer
    if Path(model).is_dir():
        return model
    if model == DEFAULT_MODEL_NAME:
        return str(default_model_path())
    return None


def _model_vocab_size(source: str) -> int | None:
    """``vocab_size`` of the config.json beside a local tokenizer, if there is one."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("vocab_size")
    return value if isinstance(value, int) else None


def _needs_tokenizer(args: argparse.Namespace) -> bool:
    return args.dataset != "jsonl" or args.prompt_format == "text"


def _check_args(args: argparse.Namespace) -> None:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    # Validates the rate and burstiness before anything is loaded.
    arrival_offsets(0, args.request_rate, args.burstiness)


def _prompts(
    requests: Sequence[BenchRequest], prompt_format: str, tokenizer: Any | None
) -> list[str | list[int]]:
    if prompt_format == "ids":
        return [list(r.prompt_token_ids) for r in requests]
    if tokenizer is None:
        raise ValueError("--prompt-format text needs a tokenizer (--tokenizer)")
    # Special tokens (a JSONL text prompt's BOS) are left out: the server adds its own.
    return [str(tokenizer.decode(r.prompt_token_ids, skip_special_tokens=True)) for r in requests]


def _served_model(args: argparse.Namespace, models: list[dict[str, Any]]) -> str:
    """``--model``, or else the first model the server lists."""
    if args.model is not None:
        return str(args.model)
    if not models or "id" not in models[0]:
        raise ValueError(f"{args.base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


def _load_tokenizer(args: argparse.Namespace, model: str) -> tuple[str | None, Any, int | None]:
    """(where the tokenizer came from, the tokenizer, the model's vocabulary size), all
    ``None`` when there is no tokenizer and the workload does without one."""
    source = _tokenizer_source(args.tokenizer, model)
    if source is not None:
        return source, AutoTokenizer.from_pretrained(source), _model_vocab_size(source)
    if _needs_tokenizer(args):
        raise ValueError(
            f"no tokenizer for the served model {model!r}: pass --tokenizer PATH "
            "(random prompts draw from its vocabulary; text prompts are decoded with it)"
        )
    return None, None, None


def _setup(args: argparse.Namespace) -> _Setup:
    _check_args(args)
    slos = parse_goodput(args.goodput)
    models = get_models(args.base_url, args.api_key, args.request_timeout)
    model = _served_model(args, models)
    source, tokenizer, vocab = _load_tokenizer(args, model)
    requests, spec = workload_from_args(args, tokenizer, vocab)
    if args.save_workload is not None:
        save_jsonl(requests, args.save_workload)
        spec["saved_to"] = str(args.save_workload)
    spec["num_requests"] = len(requests)
    prompts = _prompts(requests, args.prompt_format, tokenizer)
    return _Setup(models, model, source, requests, spec, prompts, slos)


def _config(args: argparse.Namespace, setup: _Setup) -> ServeConfig:
    return ServeConfig(
        base_url=args.base_url,
        model=setup.model,
        prompt_format=args.prompt_format,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        request_timeout_s=args.request_timeout,
        temperature=args.temperature,
        goodput_ms=setup.slos,
        extra_body=dict(args.extra_body or {}),
        api_key=args.api_key,
    )


def _warm_up_ok(config: ServeConfig, prompt: str | list[int], name: str) -> bool:
    """Send the untimed warm-up request; say why it failed if it did."""
    warm = asyncio.run(warm_up(config, prompt))
    if warm.success:
        return True
    hint = ""
    if config.prompt_format == "ids":
        hint = " (if the server takes only text prompts, try --prompt-format text)"
    print(f"{name}: the warm-up request failed: {warm.error}{hint}", file=sys.stderr)
    return False


def _report(
    args: argparse.Namespace,
    config: ServeConfig,
    setup: _Setup,
    result: ServeResult,
    records: Sequence[RequestRecord],
) -> dict[str, Any]:
    return {
        "report_version": REPORT_VERSION,
        "benchmark": "serve",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            **config.to_dict(),
            "tokenizer": setup.tokenizer_source,
            "num_prompts": args.num_prompts,
            "warmup": args.warmup,
        },
        "server_models": setup.models,
        "workload": setup.spec,
        "client": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "httpx": httpx.__version__,
        },
        "result": result.to_dict(),
        "requests": [r.to_dict() for r in records],
    }


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _exit_status(name: str, result: ServeResult) -> int:
    if result.failed:
        return 1
    if not result.output_lengths_exact:
        print(
            f"{name}: {result.num_mismatched_outputs} request(s) did not get the requested "
            "length (does the server honour ignore_eos?)",
            file=sys.stderr,
        )
        return 1
    return 0


def run_serve(args: argparse.Namespace, name: str = "convoy bench serve") -> int:
    """Run the parsed ``convoy bench serve`` command; returns the exit status.

    0 when every request succeeded with exactly its output length; 1 when some failed or got
    another length (the table and the report are still written); 2 for bad flags, a server
    that cannot be reached, or a warm-up request that fails.
    """
    try:
        setup = _setup(args)
    except (ValueError, OSError, httpx.HTTPError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    config = _config(args, setup)
    if args.warmup and not _warm_up_ok(config, setup.prompts[0], name):
        return 2

    records, duration = asyncio.run(run_requests(config, setup.prompts, setup.requests))
    result = compute_serve_result(records, duration, setup.slos)
    print(result.format_table("Serving benchmark", config))
    for error, count in list(result.errors.items())[:5]:
        print(f"{name}: {count} request(s) failed: {error}", file=sys.stderr)
    if args.json is not None:
        _write_report(args.json, _report(args, config, setup, result, records))
    return _exit_status(name, result)
