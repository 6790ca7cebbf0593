"""llama-cpp-python in its own interpreter, through ``benchmarks/peers/llamacpp_runner.py``:
continuous batching over ``n_parallel`` KV sequences with ``n_batch`` tokens per step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.comparison import paths
from benchmarks.comparison.engines.base import (
    RunResult,
    import_error,
    requests_json,
    run_subprocess_peer,
)
from benchmarks.comparison.engines.llamacpp import LLAMACPP_N_BATCH, NAME
from convoy.bench.workloads import BenchRequest


def llamacpp_status(python: str) -> str | None:
    """``None`` when llama-cpp-python is importable by ``python``; otherwise why not."""
    log = paths.LLAMACPP_BUILD_LOG.get()
    if log is not None and log.is_file():
        text = log.read_text(errors="replace")
        if "rc=" not in text:
            return f"not run: llama-cpp-python is still being built ({log} has no rc=)"
        if "rc=0" not in text:
            return f"not run: llama-cpp-python build failed (see {log})"
    if not Path(python).exists():
        return f"not run: {python} does not exist"
    error = import_error(python, "llama_cpp", timeout=120)
    return None if error is None else f"not run: cannot import llama_cpp ({error})"


def config(outtype: str, n_parallel: int) -> str:
    return (
        f"{outtype}, llama-cpp-python batched, n_parallel={n_parallel}, n_batch={LLAMACPP_N_BATCH}"
    )


class LlamaCppBatched:
    """One GGUF with ``n_parallel`` sequences and ``n_batch = n_ubatch = LLAMACPP_N_BATCH``."""

    name = NAME

    def __init__(
        self, python: str, gguf: Path, threads: int, n_parallel: int, timeout_s: float
    ) -> None:
        self.python, self.timeout_s = python, timeout_s
        self.spec: dict[str, Any] = {
            "model": str(gguf),
            "n_threads": threads,
            "n_batch": LLAMACPP_N_BATCH,
            "n_ubatch": LLAMACPP_N_BATCH,
            "n_parallel": n_parallel,
            "mode": "batched",
        }

    def unavailable(self) -> str | None:
        return llamacpp_status(self.python)

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        spec = {**self.spec, "requests": requests_json(requests)}
        runner = paths.PEERS_DIR / "llamacpp_runner.py"
        return run_subprocess_peer(self.python, runner, spec, self.timeout_s)
