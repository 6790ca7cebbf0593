"""What the parsed ``convoy bench`` workload flags mean: the requests they describe.
Shared by the offline runs (:mod:`convoy.bench.cli`) and ``bench serve``."""

from __future__ import annotations

import argparse
from typing import Any

from convoy.bench.workloads import (
    BenchRequest,
    jsonl_workload,
    random_workload,
    shared_prefix_workload,
)

__all__ = ["token_space", "workload_from_args"]

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


def _random(args: argparse.Namespace, common: dict[str, Any]) -> Workload:
    input_range = (args.input_len_min, args.input_len_max)
    output_range = (args.output_len_min, args.output_len_max)
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
