"""The report: header lines, the summary (each engine's best configuration per workload),
every configuration, and the files a run leaves (markdown, JSON, plot). ``--render`` prints
it again from the JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.comparison.machine import Target
from benchmarks.comparison.results import Cell, ratio
from benchmarks.comparison.workloads import SHARED_PREFIX
from convoy.bench import roofline


def per_run_peaks_lines(cells: Sequence[Cell]) -> list[str]:
    """The range of the peaks measured before the runs, as a header line (none if unmeasured)."""
    peaks = [r.peaks for c in cells for r in c.runs if r.peaks is not None]
    if not peaks:
        return []
    flops = [p["peak_gflops"] for p in peaks]
    bw = [p["bandwidth_gbs"] for p in peaks]
    return [
        f"- measured again before each of the {len(peaks)} runs: matmul peak "
        f"{min(flops):.1f}-{max(flops):.1f} GFLOP/s (median {statistics.median(flops):.1f}), "
        f"bandwidth {min(bw):.1f}-{max(bw):.1f} GB/s (median {statistics.median(bw):.1f}); "
        "each run's bound is taken at its own"
    ]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def best_cells(cells: Sequence[Cell]) -> dict[tuple[str, str], Cell]:
    """Per (workload, engine), the configuration with the best median throughput."""
    best: dict[tuple[str, str], Cell] = {}
    for c in cells:
        key = (c.workload, c.engine)
        cur = best.get(key)
        if cur is None or (c.median_tps or -1) > (cur.median_tps or -1):
            best[key] = c
    return best


def markdown_table(cells: Sequence[Cell]) -> str:
    """One row per cell; ``convoy/peer`` against convoy's row of the same workload.

    The best configuration of an engine on a workload is marked with ``*`` (the ratio to
    use); every configuration is listed so none is silently dropped.
    """
    best = best_cells(cells)
    convoy_tps = {w: c.median_tps for (w, e), c in best.items() if e == "convoy"}
    lines = [
        "| workload | engine | config | runs | output tok/s (median) | convoy/peer "
        "| % of roofline bound | % at start-of-run peaks | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        mark = "*" if best[(c.workload, c.engine)] is c and c.runs else ""
        r = None if c.engine == "convoy" else ratio(convoy_tps.get(c.workload), c.median_tps)
        spread = ""
        if c.runs:
            tps = [x.output_tokens_per_s for x in c.runs]
            spread = f"min {min(tps):.1f}, max {max(tps):.1f}"
        lines.append(
            f"| {c.workload} | {c.engine}{mark} | {c.config} | {len(c.runs)} "
            f"| {_fmt(c.median_tps, '.1f')} | {_fmt(r, '.2f')} "
            f"| {_fmt(c.pct_of_bound, '.1f')} | {_fmt(c.pct_of_start_bound, '.1f')} "
            f"| {c.not_run or spread} |"
        )
    return "\n".join(lines)


def cells_from_json(path: Path) -> list[Cell]:
    """The cells of a report this script saved (``compare-*.json``)."""
    return [Cell.from_dict(d) for d in json.loads(path.read_text())["cells"]]


def report_text(header: Sequence[str], cells: Sequence[Cell]) -> str:
    """The markdown report: header lines, the summary table, then every configuration."""
    return (
        "\n".join(header)
        + "\nBest configuration of each engine, output tokens/s (median); in brackets "
        "convoy's share of the roofline bound, and convoy/peer (> 1: convoy is faster):\n\n"
        + summary_table(cells)
        + "\n\nEvery configuration:\n\n"
        + markdown_table(cells)
        + "\n"
    )


def render(path: Path) -> str:
    """The report of a saved ``compare-*.json``, as the run printed it."""
    saved = json.loads(path.read_text())
    return report_text(saved.get("report_header", []), cells_from_json(path))


def _summary_column(c: Cell) -> str:
    # llama.cpp's weight types are different engines for the reader (f32 is the exact peer).
    return f"{c.engine} {c.config.split(',')[0]}" if c.engine == "llama.cpp" else c.engine


def summary_table(cells: Sequence[Cell]) -> str:
    """One row per workload: each engine's best median output tokens/s (llama.cpp per weight
    type), with convoy's percentage of the roofline bound and, for peers (a baseline
    checkout's convoy too), convoy/peer."""
    best: dict[tuple[str, str], Cell] = {}
    for c in cells:
        key = (c.workload, _summary_column(c))
        if key not in best or (c.median_tps or -1) > (best[key].median_tps or -1):
            best[key] = c
    workloads = list(dict.fromkeys(c.workload for c in cells))
    columns = list(dict.fromkeys(_summary_column(c) for c in cells))
    lines = ["| workload | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for w in workloads:
        conv = best.get((w, "convoy"))
        conv_tps = conv.median_tps if conv is not None else None
        row = []
        for col in columns:
            cell = best.get((w, col))
            if cell is None or cell.median_tps is None:
                row.append("-" if cell is None else "not run")
            elif col == "convoy":
                pct = _fmt(cell.pct_of_bound, ".0f")
                row.append(f"**{cell.median_tps:.1f}** ({pct}% of bound)")
            else:
                r = _fmt(ratio(conv_tps, cell.median_tps), ".2f")
                row.append(f"{cell.median_tps:.1f} ({r}x)")
        lines.append(f"| {w} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_plot(cells: Sequence[Cell], path: Path) -> str:
    """PNG of output tokens/s vs concurrency per engine (best config); returns a status line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "plot skipped: matplotlib is not installed "
            "(pip install matplotlib, or the `bench` extra)"
        )
    series: dict[str, list[tuple[int, float]]] = {}
    for (_, engine), c in best_cells([c for c in cells if c.concurrency is not None]).items():
        if c.median_tps is not None and c.concurrency is not None:
            series.setdefault(engine, []).append((c.concurrency, c.median_tps))
    if not series:
        return "plot skipped: no sweep results"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the report's header says about the run besides the cells."""

    stamp: str
    machine: dict[str, Any]
    machine_line: str
    peaks: dict[str, float]
    peaks_line: str
    model_dir: Path
    shape: roofline.ModelShape
    extra_lines: tuple[str, ...] = ()


def header_lines(args: argparse.Namespace, info: RunInfo, cells: Sequence[Cell]) -> list[str]:
    """The report's header: machine, peaks, model, workloads, how the medians are taken."""
    target: Target = args.target
    return [
        f"# convoy vs peers ({info.stamp})",
        "",
        f"- {info.machine_line}",
        f"- {info.peaks_line} (at the start)",
        *per_run_peaks_lines(cells),
        f"- model: `{info.model_dir.name}`, {info.shape.num_params / 1e6:.1f}M parameters, "
        f"{target.dtype} on {target.device} (llama.cpp: per its config column)",
        *info.extra_lines,
        f"- workload `random`: {args.num_prompts} prompts of {args.input_len_min}-"
        f"{args.input_len_max} random token ids, {args.output_len} output tokens each (EOS "
        f"ignored), seed {args.seed}; `c=N`: the first N of those, all at once; "
        f"`{SHARED_PREFIX}`: {args.num_prompts} prompts of one shared {args.prefix_len}-token "
        f"prefix + {args.suffix_len} own tokens, {args.prefix_output_len} output tokens each",
        f"- median of {args.repeats} interleaved runs; `*` marks an engine's best config per "
        "workload; convoy/peer > 1 means convoy is faster",
        "",
    ]


def write_outputs(args: argparse.Namespace, info: RunInfo, cells: Sequence[Cell]) -> str:
    """Print the report and write ``compare-STAMP.{md,json,png}``; returns the closing line."""
    header = header_lines(args, info, cells)
    report = report_text(header, cells)
    print()
    print(report)
    md = args.out_dir / f"compare-{info.stamp}.md"
    md.write_text(report)
    plot_msg = write_plot(cells, args.out_dir / f"compare-{info.stamp}.png")
    saved = {
        "time": info.stamp,
        "command": sys.argv,
        "machine": info.machine,
        "roofline": info.peaks,
        "model": str(info.model_dir),
        "model_shape": dataclasses.asdict(info.shape),
        "args": {k: str(v) if isinstance(v, Path | Target) else v for k, v in vars(args).items()},
        "cells": [c.to_dict() for c in cells],
        "report_header": header,
    }
    md.with_suffix(".json").write_text(json.dumps(saved, indent=2) + "\n")
    return f"wrote {md} and {md.with_suffix('.json')}; {plot_msg}"
