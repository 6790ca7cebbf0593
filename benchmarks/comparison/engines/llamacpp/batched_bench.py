"""llama.cpp's own ``llama-batched-bench``: B sequences of a fixed prompt length PP, TG tokens
generated each; output tokens/s = B * TG / T, T its total time (prompt processing
included)."""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.comparison import paths
from benchmarks.comparison.engines.base import RunResult
from benchmarks.comparison.engines.llamacpp import LLAMACPP_N_BATCH, NAME
from benchmarks.comparison.results import EngineError
from convoy.bench.workloads import BenchRequest

BATCHED_BENCH_N_BATCH = 2048  # llama-batched-bench -b (its -ub is LLAMACPP_N_BATCH)
LLAMACPP_CTX_PAD = 256  # llama.cpp pads n_ctx and its per-sequence share to this
LLAMACPP_TOOLS_BUILD = (
    "benchmarks/peers/build_llamacpp_tools.sh [LLAMA_CPP_SRC] [BUILD_DIR] (cmake -S "
    "LLAMA_CPP_SRC -B BUILD_DIR -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF && cmake --build BUILD_DIR -j2 --target "
    "llama-batched-bench llama-server)"
)


def mean_input_len(requests: Sequence[BenchRequest]) -> int:
    """The requests' mean prompt length, rounded (llama-batched-bench's fixed ``-npp``)."""
    if not requests:
        raise ValueError("no requests")
    return round(statistics.fmean(r.input_len for r in requests))


def batched_bench_ctx(n_seqs: int, prompt_len: int, output_len: int) -> int:
    """``-c`` for llama-batched-bench: ``n_seqs`` KV slots of ``prompt_len + output_len``
    tokens, each padded to 256 as llama.cpp pads its per-sequence share (it skips a
    configuration whose ``B * (PP + TG)`` exceeds the context, printing no row)."""
    per_seq = -(-(prompt_len + output_len) // LLAMACPP_CTX_PAD) * LLAMACPP_CTX_PAD
    return n_seqs * per_seq


@dataclass(frozen=True)
class BatchedBenchRow:
    """One row of llama-batched-bench's table (times in s, speeds in tokens/s)."""

    pp: int
    tg: int
    b: int
    n_kv: int
    t_pp_s: float
    s_pp: float
    t_tg_s: float
    s_tg: float
    t_s: float
    s: float

    @property
    def output_tokens_per_s(self) -> float:
        """Generated tokens over the total time, prompt processing included: B * TG / T."""
        return self.b * self.tg / self.t_s


def parse_batched_bench(text: str) -> list[BatchedBenchRow]:
    """The result rows of llama-batched-bench's markdown table in ``text`` (its log around
    the table is ignored)."""
    rows: list[BatchedBenchRow] = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) != 10 or not line.lstrip().startswith("|"):
            continue
        try:
            ints = [int(c) for c in cols[:4]]
            floats = [float(c) for c in cols[4:]]
        except ValueError:
            continue  # the header and the |---| line
        rows.append(BatchedBenchRow(*ints, *floats))
    return rows


def batched_bench_row(rows: Sequence[BatchedBenchRow], pp: int, tg: int, b: int) -> BatchedBenchRow:
    """The row for (``pp``, ``tg``, ``b``); :class:`EngineError` when it is missing."""
    for row in rows:
        if (row.pp, row.tg, row.b) == (pp, tg, b):
            return row
    raise EngineError(
        f"llama-batched-bench printed no row for PP={pp} TG={tg} B={b} "
        f"(got {[(r.pp, r.tg, r.b) for r in rows]}; context too small?)"
    )


def llamacpp_tools_status(binary: Path) -> str | None:
    """``None`` when llama.cpp's ``binary`` (llama-batched-bench) can run; otherwise why not."""
    if binary.is_file() and os.access(binary, os.X_OK):
        return None
    # A build log says something only about the default tools folder, the one it builds.
    log = paths.LLAMACPP_TOOLS_BUILD_LOG.get()
    in_default_dir = binary.parent == paths.LLAMACPP_TOOLS_DIR.get()
    if (
        in_default_dir
        and log is not None
        and log.is_file()
        and "rc=" not in log.read_text(errors="replace")
    ):
        return f"not run: {binary.name} is still being built ({log})"
    return f"not run: {binary} not found; build it with {LLAMACPP_TOOLS_BUILD}"


@dataclass(frozen=True)
class BenchShape:
    """llama-batched-bench's view of a workload: B sequences of PP prompt tokens, TG out."""

    n_seqs: int
    pp: int
    tg: int

    @classmethod
    def of(cls, requests: Sequence[BenchRequest]) -> BenchShape:
        out_lens = {r.output_len for r in requests}
        return cls(len(requests), mean_input_len(requests), max(out_lens) if out_lens else 0)

    def config(self, outtype: str) -> str:
        return (
            f"{outtype}, llama-batched-bench, B={self.n_seqs}, PP={self.pp} fixed (the mean "
            f"prompt length), TG={self.tg}, b={BATCHED_BENCH_N_BATCH}, ub={LLAMACPP_N_BATCH}"
        )

    def fixed_requests(self) -> list[BenchRequest]:
        """The requests it actually runs (for the roofline bound)."""
        return [BenchRequest([0] * self.pp, self.tg) for _ in range(self.n_seqs)]


class BatchedBench:
    """One ``llama-batched-bench -npl B -npp PP -ntg TG`` run of a GGUF."""

    name = NAME

    def __init__(
        self, binary: Path, gguf: Path, shape: BenchShape, threads: int, timeout_s: float
    ) -> None:
        self.binary, self.shape, self.timeout_s = binary, shape, timeout_s
        s = shape
        self.cmd = [
            str(binary),
            *("-m", str(gguf), "-c", str(batched_bench_ctx(s.n_seqs, s.pp, s.tg))),
            *("-b", str(BATCHED_BENCH_N_BATCH), "-ub", str(LLAMACPP_N_BATCH)),
            *("-npp", str(s.pp), "-ntg", str(s.tg), "-npl", str(s.n_seqs)),
            *("-t", str(threads), "-tb", str(threads)),
        ]

    def unavailable(self) -> str | None:
        return llamacpp_tools_status(self.binary)

    def run(self, requests: Sequence[BenchRequest]) -> RunResult:
        proc = subprocess.run(self.cmd, capture_output=True, text=True, timeout=self.timeout_s)
        text = proc.stdout + "\n" + proc.stderr
        if proc.returncode != 0:
            tail = " | ".join(text.strip().splitlines()[-3:])
            raise EngineError(f"llama-batched-bench exited {proc.returncode}: {tail}")
        s = self.shape
        row = batched_bench_row(parse_batched_bench(text), s.pp, s.tg, s.n_seqs)
        return row.t_s, [s.tg] * len(requests)
