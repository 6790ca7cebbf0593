"""The ``convoy`` command line's structure: no import cycles, no abbreviated flags.

The import graph is read from the sources (ast), so this needs no import of convoy itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "convoy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs, in functions too; ``if TYPE_CHECKING:`` never does."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for stmt in node.orelse for n in _imports_in(stmt))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]
) -> Iterator[str]:
    """The convoy modules an import statement loads."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name in modules)
        return
    base = node.module or ""
    if node.level:
        parent = module.split(".")
        parent = parent[: len(parent) - node.level + (1 if is_package else 0)]
        base = ".".join([*parent, base] if base else parent)
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
            yield sub
        elif base in modules:
            yield base


def import_graph() -> dict[str, set[str]]:
    """convoy module -> the convoy modules it imports."""
    paths = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        graph[name] = {
            t
            for node in _imports(tree)
            for t in _targets(node, name, is_package, modules)
            if t != name
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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
