"""benchmarks/compare.py: the arithmetic and table logic (no engine is run).

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from convoy.bench.workloads import BenchRequest


def _load_compare() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("benchmarks_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


def test_median_or_none() -> None:
    assert compare.median_or_none([]) is None
    assert compare.median_or_none([3.0, 1.0, 2.0]) == 2.0
    assert compare.median_or_none([1.0, 2.0, 3.0, 10.0]) == 2.5  # (2 + 3) / 2


def test_ratio() -> None:
    assert compare.ratio(300.0, 150.0) == 2.0
    assert compare.ratio(None, 150.0) is None
    assert compare.ratio(300.0, None) is None
    assert compare.ratio(300.0, 0.0) is None


def test_fraction_of_bound() -> None:
    assert compare.fraction_of_bound(1.0, 4.0) == 0.25
    with pytest.raises(ValueError):
        compare.fraction_of_bound(1.0, 0.0)


def test_cell_medians_and_pct_of_bound() -> None:
    cell = compare.Cell("random", "convoy", "f32")
    assert cell.median_tps is None and cell.pct_of_bound is None
    # 100 tokens in 1, 2 and 4 s: 100, 50, 25 tok/s -> median 50; median elapsed 2 s.
    cell.runs = [compare.Run(1.0, 100), compare.Run(2.0, 100), compare.Run(4.0, 100)]
    cell.bound_s = 0.5
    assert cell.median_tps == 50.0
    assert cell.median_elapsed_s == 2.0
    assert cell.pct_of_bound == 25.0  # 0.5 s / 2 s


def test_check_lengths() -> None:
    reqs = [BenchRequest([1, 2], 3), BenchRequest([4], 2)]
    compare.check_lengths([3, 2], reqs)
    with pytest.raises(compare.EngineError, match="1 of 2"):
        compare.check_lengths([3, 1], reqs)


def test_markdown_table_ratio_best_and_not_run() -> None:
    convoy = compare.Cell("random", "convoy", "f32", runs=[compare.Run(1.0, 200)])
    small = compare.Cell("random", "hf", "batch=16", runs=[compare.Run(1.0, 50)])
    big = compare.Cell("random", "hf", "batch=64", runs=[compare.Run(1.0, 100)])
    skipped = compare.Cell("random", "vllm", "-", not_run="not run: not installed")
    table = compare.markdown_table([convoy, small, big, skipped])
    rows = table.splitlines()[2:]
    assert "| convoy* |" in rows[0]
    assert "| hf | batch=16 |" in rows[1] and "| 4.00 |" in rows[1]  # 200 / 50
    assert "| hf* | batch=64 |" in rows[2] and "| 2.00 |" in rows[2]  # 200 / 100, best
    assert rows[3].endswith("| not run: not installed |")
