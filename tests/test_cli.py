"""The ``convoy`` command line's structure: no import cycles, no abbreviated flags.

The whole package's layering is tests/test_imports.py's.
"""

from __future__ import annotations

import pytest

from tests.import_graph import cycles, import_graph


def _is_cli(module: str) -> bool:
    return module in ("convoy.cli", "convoy.cli_args") or module.startswith("convoy.bench")


def test_cli_and_bench_have_no_import_cycles() -> None:
    graph = import_graph()
    assert {"convoy.cli", "convoy.bench.cli", "convoy.bench.serve"} <= set(graph)
    assert "convoy.bench.args" in graph["convoy.bench.serve"]  # imported at the top
    assert [c for c in cycles(graph) if any(_is_cli(m) for m in c)] == []


def test_cycle_finder_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_flags_are_never_abbreviated() -> None:
    from convoy.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "throughput", "--input-len-mi", "8"])
    args = parser.parse_args(["bench", "throughput", "--input-len", "32", "--output-len", "16"])
    assert (args.input_len, args.output_len, args.input_len_min) == (32, 16, None)
