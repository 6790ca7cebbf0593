"""Command-line flags generated from dataclasses, shared by ``convoy`` and ``convoy bench``.

One flag per field, typed and documented from the field's annotation and ``help`` metadata,
so a command line and the Python API it feeds cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Set
from typing import Any

__all__ = ["add_dataclass_arguments", "base_type", "flag", "pick_fields"]


def flag(name: str) -> str:
    """The flag of a field or destination name: ``max_num_seqs`` -> ``--max-num-seqs``."""
    return "--" + name.replace("_", "-")


def base_type(tp: Any) -> tuple[Any, bool]:
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
    """One flag per field of ``cls``, typed and documented from its annotation and ``help``.

    ``rename`` gives a field another flag (and namespace) name; :func:`pick_fields` maps it
    back. Unset flags stay out of the namespace, so the dataclass's own defaults apply.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            _add_field(parser, f, hints[f.name], (rename or {}).get(f.name, f.name))


def _add_field(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    f: dataclasses.Field[Any],
    annotation: Any,
    dest: str,
) -> None:
    tp, _ = base_type(annotation)
    # List fields default to [] via default_factory; None means "unset" here.
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = f.metadata.get("help", "")
    if default not in (None, [], {}):
        help_text += f" (default: {default})"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
        parser.add_argument(flag(dest), action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        parser.add_argument(flag(dest), type=item, nargs="+", **kwargs)
    else:
        parser.add_argument(flag(dest), type=tp, **kwargs)


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
