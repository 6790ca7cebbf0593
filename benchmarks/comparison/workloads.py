"""The workloads of one run, built from the command line: every engine gets the same token
ids (:mod:`convoy.bench.workloads`)."""

from __future__ import annotations

import argparse

from convoy.bench.workloads import BenchRequest, random_workload, shared_prefix_workload

SHARED_PREFIX = "shared-prefix"

# Workload name -> (the concurrency its requests run at, ``None``: all at once; the requests).
Workloads = dict[str, tuple[int | None, list[BenchRequest]]]


def _random(args: argparse.Namespace, n: int, vocab: int, avoid: list[int]) -> list[BenchRequest]:
    return random_workload(
        n,
        (args.input_len_min, args.input_len_max),
        (args.output_len, args.output_len),
        vocab,
        args.seed,
        avoid,
    )


def build_workloads(args: argparse.Namespace, vocab: int, avoid: list[int]) -> Workloads:
    """``random``, ``c=N`` for each ``--concurrency`` (the first N random requests; ``sweep``)
    and ``shared-prefix``, as ``--workloads`` asks."""
    base = _random(args, args.num_prompts, vocab, avoid)
    workloads: Workloads = {}
    if "random" in args.workloads:
        workloads["random"] = (None, base)
    if "sweep" in args.workloads:
        top = max(args.concurrency)
        # A concurrency above --num-prompts draws a larger random workload of the same seed.
        pool = base if top <= len(base) else _random(args, top, vocab, avoid)
        for c in args.concurrency:
            workloads[f"c={c}"] = (c, pool[:c])
    if SHARED_PREFIX in args.workloads:
        workloads[SHARED_PREFIX] = (
            None,
            shared_prefix_workload(
                1,
                args.prefix_len,
                args.suffix_len,
                args.num_prompts,
                args.prefix_output_len,
                vocab,
                args.seed,
                avoid,
            ),
        )
    return workloads
