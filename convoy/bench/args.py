"""What the parsed ``convoy bench`` flags mean: the workload they describe and where the
result goes. Shared by the offline runs (:mod:`convoy.bench.cli`) and ``bench serve``.

vLLM's flag names mean what they mean in ``vllm bench``: ``--input-len L`` with
``--random-range-ratio r`` draws prompt lengths uniformly from the integers in
``[floor(L * (1 - r)), ceil(L * (1 + r))]``, and ``--output-len`` output lengths likewise (at
least 1). Unlike vLLM no special tokens are subtracted: convoy sends the token ids as they
are, so a prompt has exactly the drawn length.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from convoy.bench.workloads import (
    BenchRequest,
    jsonl_workload,
    random_workload,
    shared_prefix_workload,
)

__all__ = ["result_path", "token_space", "vllm_length_range", "workload_from_args"]

# Defaults of convoy's own random-workload flags (--input-len-min ...).
DEFAULT_INPUT_LEN_RANGE = (64, 256)
DEFAULT_OUTPUT_LEN_RANGE = (32, 128)
# Output length of a shared-prefix workload without --output-len.
DEFAULT_SHARED_PREFIX_OUTPUT_LEN = 64

Workload = tuple[list[BenchRequest], dict[str, Any]]


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


def vllm_length_range(length: int, ratio: float, minimum: int = 0) -> tuple[int, int]:
    """vLLM's random-dataset bounds around ``length``: ``[floor(length * (1 - ratio)),
    ceil(length * (1 + ratio))]``, both raised to at least ``minimum``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    lo = math.floor(length * (1.0 - ratio))
    hi = math.ceil(length * (1.0 + ratio))
    return max(lo, minimum), max(hi, minimum)


def _length_range(args: argparse.Namespace, kind: str, default: tuple[int, int]) -> tuple[int, int]:
    """The random workload's ``kind`` ("input" or "output") length range: from vLLM's
    ``--{kind}-len`` and ``--random-range-ratio``, or convoy's ``--{kind}-len-min/max``."""
    length = getattr(args, f"{kind}_len")
    lo = getattr(args, f"{kind}_len_min")
    hi = getattr(args, f"{kind}_len_max")
    if length is None:
        return (default[0] if lo is None else lo, default[1] if hi is None else hi)
    if lo is not None or hi is not None:
        raise ValueError(f"give --{kind}-len or --{kind}-len-min/--{kind}-len-max, not both")
    # vLLM keeps outputs at one token or more; a prompt range reaching 0 is an error below.
    return vllm_length_range(length, args.random_range_ratio, 1 if kind == "output" else 0)


def _check_range_ratio(args: argparse.Namespace) -> None:
    if args.random_range_ratio == 0.0:
        return
    if args.dataset != "random" or (args.input_len is None and args.output_len is None):
        raise ValueError(
            "--random-range-ratio applies to --input-len and --output-len of --dataset random"
        )


def _random(args: argparse.Namespace, common: dict[str, Any]) -> Workload:
    input_range = _length_range(args, "input", DEFAULT_INPUT_LEN_RANGE)
    output_range = _length_range(args, "output", DEFAULT_OUTPUT_LEN_RANGE)
    if input_range[0] < 1:
        raise ValueError(
            f"prompt lengths {list(input_range)} include 0 tokens: raise --input-len or "
            "lower --random-range-ratio"
        )
    spec: dict[str, Any] = {
        "dataset": "random",
        "num_prompts": args.num_prompts,
        "input_len_range": list(input_range),
        "output_len_range": list(output_range),
        **common,
    }
    requests = random_workload(
        args.num_prompts,
        input_range,
        output_range,
        common["vocab_size"],
        common["seed"],
        common["avoid_ids"],
    )
    return requests, spec


def _shared_prefix(args: argparse.Namespace, common: dict[str, Any]) -> Workload:
    per_group = args.num_prompts // max(args.num_groups, 1)
    if args.num_groups < 1 or per_group < 1:
        raise ValueError(
            f"--num-prompts {args.num_prompts} over --num-groups {args.num_groups} "
            "leaves no request per group"
        )
    output_len = DEFAULT_SHARED_PREFIX_OUTPUT_LEN if args.output_len is None else args.output_len
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
        common["vocab_size"],
        common["seed"],
        common["avoid_ids"],
    )
    return requests, spec


def _jsonl(args: argparse.Namespace, tokenizer: Any | None) -> Workload:
    if args.dataset_path is None:
        raise ValueError("--dataset jsonl needs --dataset-path")
    spec = {"dataset": "jsonl", "path": str(args.dataset_path), "output_len": args.output_len}
    return jsonl_workload(args.dataset_path, tokenizer, args.output_len), spec


def workload_from_args(
    args: argparse.Namespace, tokenizer: Any | None, model_vocab_size: int | None
) -> Workload:
    """The requests the workload flags describe, and the recipe that rebuilds them.

    ``tokenizer`` (a Hugging Face tokenizer) gives the token space of random prompts and
    encodes JSONL text prompts; it may be ``None`` only for a JSONL file of token ids.
    """
    _check_range_ratio(args)
    vocab: int = 0
    avoid: list[int] = []
    if tokenizer is None:
        if args.dataset != "jsonl":
            raise ValueError(f"--dataset {args.dataset} needs a tokenizer")
    else:
        vocab, avoid = token_space(tokenizer, model_vocab_size)
    common = {"vocab_size": vocab, "avoid_ids": avoid, "seed": args.dataset_seed}
    if args.dataset == "random":
        requests, spec = _random(args, common)
    elif args.dataset == "shared-prefix":
        requests, spec = _shared_prefix(args, common)
    else:
        requests, spec = _jsonl(args, tokenizer)
    if not requests:
        raise ValueError("the workload has no requests")
    return requests, spec


def result_path(args: argparse.Namespace) -> Path | None:
    """Where the JSON result goes: ``--json`` (vLLM's ``--output-json``), or with vLLM's
    ``--save-result`` ``--result-dir`` / ``--result-filename`` (by default
    ``convoy-COMMAND-TIME.json`` in the working directory); ``None`` for nowhere."""
    named = args.result_filename is not None or args.result_dir is not None
    if args.json is not None:
        if named:
            raise ValueError("give --json or --result-dir/--result-filename, not both")
        path: Path = args.json
        return path
    if not (args.save_result or named):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = args.result_filename or f"convoy-{args.bench_command}-{stamp}.json"
    return Path(args.result_dir or ".") / name
