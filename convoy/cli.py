"""``convoy`` command line. Flags are generated from the config and SamplingParams dataclasses,
so the CLI and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Mapping, Sequence, Set
from typing import Any

from convoy.config import CONFIG_CLASSES, ServerConfig
from convoy.sampling_params import SamplingParams

# Sampling fields a command line can't express well.
_SKIP_SAMPLING = {"logit_bias"}
# Sampling fields whose flag would clash with an engine flag (the engine's --seed).
_RENAME_SAMPLING = {"seed": "sampling_seed"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: Set[str] = frozenset(),
    rename: Mapping[str, str] | None = None,
) -> None:
    """One flag per field, typed and documented from the field's annotation and ``help``.

    ``rename`` gives a field another flag (and namespace) name; :func:`pick_fields` maps it back.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        default = (
            f.default if f.default is not dataclasses.MISSING else None
        )  # list fields default to [] via default_factory; None means "unset" here
        help_text = f.metadata.get("help", "")
        if default not in (None, [], {}):
            help_text += f" (default: {default})"
        dest = (rename or {}).get(f.name, f.name)
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        flag = _flag(dest)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            parser.add_argument(flag, type=item, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, type=tp, **kwargs)


def pick_fields(
    args: argparse.Namespace, cls: type, rename: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The parsed values that belong to ``cls``, keyed by field name."""
    given = vars(args)
    picked = {}
    for f in dataclasses.fields(cls):
        dest = (rename or {}).get(f.name, f.name)
        if dest in given:
            picked[f.name] = given[dest]
    return picked


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convoy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate completions for prompts (offline, batched)",
        description="Generate a completion for each prompt, all batched together.",
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
    )
    serve.add_argument("model_positional", nargs="?", metavar="MODEL", help="same as --model")
    for cls in (*CONFIG_CLASSES, ServerConfig):
        add_dataclass_arguments(serve.add_argument_group(cls.__name__), cls)

    # Imported here: convoy.bench.cli imports this module's helpers.
    from convoy.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from convoy import LLM

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
    from convoy.config import EngineConfig
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
        from convoy.bench.cli import run_bench

        return run_bench(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
