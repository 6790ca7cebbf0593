"""The JSON-in, JSON-out protocol every peer runner speaks with ``benchmarks/compare.py``.

Runners execute in the peer's own virtual environment (no convoy there), as scripts, so this
sibling module is imported by path: the script's directory is first on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any


def run_main(name: str, run: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str]) -> int:
    """``NAME IN.json OUT.json``: ``run(spec)`` and write its result; errors go to OUT.json too,
    so the harness can print the reason in its table."""
    if len(argv) != 2:
        print(f"usage: {name} IN.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        result = run(spec)
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0 if result.get("error") is None else 1
