"""convoy from another source checkout (``--baseline-checkout DIR``), so that "convoy before
and after a change" is measured in one interleaved run.

Each engine configuration is one subprocess of ``benchmarks/peers/convoy_runner.py --serve``,
started with this run's own interpreter (the same torch) and ``PYTHONPATH=DIR``; it keeps its
engine loaded across runs, as the in-process convoy does, and times each run with that
checkout's :func:`convoy.bench.throughput.run_throughput`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.comparison.engines.base import RunResult, requests_json
from benchmarks.comparison.paths import PEERS_DIR
from benchmarks.comparison.results import EngineError
from convoy.bench.workloads import BenchRequest

NAME = "convoy@baseline"
REQUIRED = ("convoy/__init__.py", "convoy/bench/throughput.py")


def checkout_problem(checkout: Path) -> str | None:
    """Why ``checkout`` is not a convoy source checkout the runner can import; ``None`` if it
    is."""
    for rel in REQUIRED:
        if not (checkout / rel).is_file():
            return f"{checkout} has no {rel}: not a convoy source checkout"
    return None


def checkout_commit(checkout: Path) -> str | None:
    """The checkout's short commit id, ``None`` outside git."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def extensions_dir(cache_dir: Path, checkout: Path) -> Path:
    """Where the checkout's C++ kernels are built: its own folder, as torch's extension cache
    is keyed by the extension's name, the same in every checkout; sharing it would rebuild
    one checkout's kernels over the other's at every start."""
    digest = hashlib.sha1(str(checkout.resolve()).encode()).hexdigest()[:12]
    return cache_dir / "torch-extensions" / f"baseline-{digest}"


class BaselineWorker:
    """One convoy engine of the baseline checkout, in its own process, answering run after
    run; its limits (``max_num_seqs``, ``max_num_batched_tokens``: ``None`` where the
    checkout does not say) come from the loaded engine."""

    name = NAME

    def __init__(
        self,
        checkout: Path,
        engine: dict[str, Any],
        threads: int | None,
        cache_dir: Path,
        timeout_s: float,
    ) -> None:
        self.checkout, self.timeout_s = checkout, timeout_s
        env = {
            **os.environ,
            "PYTHONPATH": str(checkout),
            "TORCH_EXTENSIONS_DIR": str(extensions_dir(cache_dir, checkout)),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(PEERS_DIR / "convoy_runner.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        atexit.register(self.close)
        spec = {"checkout": str(checkout), "threads": threads, "engine": engine}
        try:
            ready = self._ask(spec)
        except Exception:
            self.close()
            raise
        self.max_num_seqs = int(ready.get("max_num_seqs") or engine["max_num_seqs"])
        tokens = ready.get("max_num_batched_tokens")
        self.max_num_batched_tokens = None if tokens is None else int(tokens)
        self.ignored = list(ready.get("ignored") or [])

    def unavailable(self) -> str | None:
        problem = checkout_problem(self.checkout)
        if problem is None and self.proc.poll() is not None:
            problem = f"the baseline runner exited {self.proc.returncode}"
        return None if problem is None else f"not run: {problem}"

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        answer = self._ask({"requests": requests_json(requests)})
        return float(answer["elapsed_s"]), [int(n) for n in answer["output_lens"]]

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message, wait up to the timeout for its one-line answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise EngineError(f"the baseline runner is gone ({e}; its log is above)") from e
        readable, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not readable:
            self.close()
            raise EngineError(f"the baseline runner gave no answer in {self.timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise EngineError(f"the baseline runner exited {self.proc.wait()} (its log is above)")
        answer: dict[str, Any] = json.loads(line)
        if answer.get("error"):
            raise EngineError(str(answer["error"]))
        return answer

    def close(self) -> None:
        """End the process: end of input stops it; a stuck one is killed."""
        if self.proc.poll() is not None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
