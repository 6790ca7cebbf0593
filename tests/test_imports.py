"""The package's layers: arrows point down only (server -> engine -> worker -> model), with
no import cycle anywhere and no convoy import tucked inside a function to dodge one."""

from __future__ import annotations

from tests.import_graph import cycles, import_graph

# Layer -> the layers it must never import. ``convoy.model`` is the bottom: it knows nothing
# of who drives it; the worker runs a model for an engine but never sees the engine's types.
FORBIDDEN = {
    "convoy.model": (
        "convoy.worker",
        "convoy.engine",
        "convoy.entrypoints",
        "convoy.server",
        "convoy.bench",
        "convoy.cli",
    ),
    "convoy.worker": (
        "convoy.engine",
        "convoy.entrypoints",
        "convoy.server",
        "convoy.bench",
        "convoy.cli",
    ),
    "convoy.engine": ("convoy.entrypoints", "convoy.server", "convoy.bench", "convoy.cli"),
    "convoy.server": ("convoy.bench", "convoy.cli"),
    "convoy.utils": ("convoy.",),
}

# Imports inside functions, each with its reason; anything else belongs at the top.
ALLOWED_IN_FUNCTIONS = {
    # Only `convoy serve` needs the HTTP server stack; every other command skips loading it.
    ("convoy.cli", "convoy.server.run"),
}


def _in(module: str, layer: str) -> bool:
    return module == layer.rstrip(".") or module.startswith(layer.rstrip(".") + ".")


def test_no_import_cycles_anywhere() -> None:
    assert cycles(import_graph()) == []


def test_layers_import_only_downwards() -> None:
    graph = import_graph()
    assert "convoy.worker.runner" in graph and "convoy.model.attention.base" in graph
    wrong = sorted(
        (module, target)
        for module, targets in graph.items()
        for layer, banned in FORBIDDEN.items()
        if _in(module, layer)
        for target in targets
        if any(_in(target, b) for b in banned)
    )
    assert wrong == []


def test_no_convoy_imports_inside_functions() -> None:
    hidden = sorted(
        (module, target)
        for module, targets in import_graph(only_in_functions=True).items()
        for target in targets
        if (module, target) not in ALLOWED_IN_FUNCTIONS
    )
    assert hidden == []


def test_the_checks_see_what_they_forbid() -> None:
    # The rules are live: today's engine imports the worker, which would be wrong upwards.
    graph = import_graph()
    assert "convoy.worker.runner" in graph["convoy.engine.engine"]
    assert any(_in(t, "convoy.model") for t in graph["convoy.worker.runner"])
