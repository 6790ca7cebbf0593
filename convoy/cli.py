"""``convoy`` command line. Flags are generated from the config and SamplingParams dataclasses,
so the CLI and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from convoy.bench.cli import run_bench
from convoy.bench.parser import add_bench_parser
from convoy.cli_args import add_dataclass_arguments, pick_fields
from convoy.config import CONFIG_CLASSES, EngineConfig, ServerConfig
from convoy.entrypoints.llm import LLM
from convoy.sampling_params import SamplingParams

__all__ = ["add_dataclass_arguments", "build_parser", "main", "pick_fields"]

# Sampling fields a command line can't express well.
_SKIP_SAMPLING = {"logit_bias"}
# Sampling fields whose flag would clash with an engine flag (the engine's --seed).
_RENAME_SAMPLING = {"seed": "sampling_seed"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convoy", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate completions for prompts (offline, batched)",
        description="Generate a completion for each prompt, all batched together.",
        allow_abbrev=False,
    )
    gen.add_argument("prompts", nargs="*", help="prompts (read one per line from stdin if none)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    for cls in CONFIG_CLASSES:
        add_dataclass_arguments(gen.add_argument_group(cls.__name__), cls)
    add_dataclass_arguments(
        gen.add_argument_group("SamplingParams"),
        SamplingParams,
        skip=_SKIP_SAMPLING,
        rename=_RENAME_SAMPLING,
    )

    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions and friends over HTTP.",
        allow_abbrev=False,
    )
    serve.add_argument("model_positional", nargs="?", metavar="MODEL", help="same as --model")
    for cls in (*CONFIG_CLASSES, ServerConfig):
        add_dataclass_arguments(serve.add_argument_group(cls.__name__), cls)

    add_bench_parser(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    prompts: list[str] = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("convoy generate: no prompts given", file=sys.stderr)
        return 2
    engine_kwargs: dict[str, Any] = {}
    for cls in CONFIG_CLASSES:
        engine_kwargs.update(pick_fields(args, cls))
    try:
        params = SamplingParams(**pick_fields(args, SamplingParams, _RENAME_SAMPLING))
        llm = LLM(**engine_kwargs)
    except ValueError as e:  # a bad flag value, an unsupported or missing checkpoint
        print(f"convoy generate: {e}", file=sys.stderr)
        return 2
    if args.chat:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(convs, params)
    else:
        outputs = llm.generate(list(prompts), params)
    for prompt, out in zip(prompts, outputs, strict=True):
        for comp in out.outputs:
            if args.json:
                record = {
                    "prompt": prompt,
                    "index": comp.index,
                    "text": comp.text,
                    "token_ids": comp.token_ids,
                    "finish_reason": comp.finish_reason,
                }
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(
                    f"--- prompt: {prompt!r} [{comp.finish_reason}, {len(comp.token_ids)} tokens]"
                )
                print(prompt + comp.text if not args.chat else comp.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Imported on use: only `serve` needs the HTTP server stack, slow to import.
    from convoy.server.run import serve

    if args.model_positional is not None:
        args.model = args.model_positional
    engine_kwargs: dict[str, Any] = {}
    for cls in CONFIG_CLASSES:
        engine_kwargs.update(pick_fields(args, cls))
    try:
        engine_config = EngineConfig.from_kwargs(**engine_kwargs)
        server_config = ServerConfig(**pick_fields(args, ServerConfig))
    except ValueError as e:
        print(f"convoy serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(engine_config, server_config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench":
        return run_bench(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
