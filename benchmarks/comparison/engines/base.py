"""The interface every engine adapter meets, and the plumbing of the subprocess peers."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmarks.comparison.machine import Target
from benchmarks.comparison.results import EngineError
from convoy.bench.workloads import BenchRequest

# One timed run: (wall seconds, each request's number of output tokens in request order).
RunResult = tuple[float, list[int]]


class PeerAdapter(Protocol):
    """One engine configuration, ready to be timed on a workload.

    ``name`` is the engine as the report names it. ``unavailable`` says why the engine cannot
    run here ("not run: ..." with how to install or build it), ``None`` when it can; it is
    cheap to call again. ``run`` times the whole workload once, its set-up (loading, warm-up)
    outside the clock, and raises :class:`EngineError` with a reason for the table.
    """

    name: str

    def unavailable(self) -> str | None: ...

    def run(self, requests: Sequence[BenchRequest]) -> RunResult: ...


def cpu_peer_reason(target: Target) -> str | None:
    """Why a CPU-only peer does not run on ``target``; ``None`` on the CPU."""
    if target.device == "cpu":
        return None
    return f"a CPU peer: not run with --device {target.device}"


def requests_json(requests: Sequence[BenchRequest]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in requests]


def run_subprocess_peer(
    python: str,
    runner: Path,
    spec: dict[str, Any],
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run a peer runner script in another interpreter with a JSON workload; parse its result.

    ``env`` is added to this process's environment for the runner.
    """
    with tempfile.TemporaryDirectory(prefix="convoy-compare-") as tmp:
        inp, out = Path(tmp, "in.json"), Path(tmp, "out.json")
        inp.write_text(json.dumps(spec))
        proc = subprocess.run(
            [python, str(runner), str(inp), str(out)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **env} if env else None,
        )
        if not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise EngineError(f"runner exited {proc.returncode}: {' | '.join(tail)}")
        result = json.loads(out.read_text())
    if result.get("error"):
        raise EngineError(str(result["error"]))
    return float(result["elapsed_s"]), [int(n) for n in result["output_lens"]]


@functools.cache
def import_error(python: str, module: str, timeout: float) -> str | None:
    """``None`` when ``python`` imports ``module``; else the last line of its error (asked
    once per interpreter and module: an import can take minutes)."""
    proc = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["?"])[-1]
