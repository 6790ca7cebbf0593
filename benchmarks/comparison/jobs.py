"""The job table: which engine configuration runs on which workload, and its roofline bound.

Each engine's rows come from one function below, listed in :data:`ENGINE_JOBS` in the order
the report shows them. An engine that is not installed, or fails to load, still gets its rows,
saying why. Each run's bound is :func:`convoy.bench.roofline.schedule_bound` of the workload
under the engine's own batching limits.
"""

from __future__ import annotations

import argparse
import functools
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.comparison.engines import convoy_baseline, hf_cb, hf_static, llamacpp, vllm_cpu
from benchmarks.comparison.engines.base import PeerAdapter, RunResult, cpu_peer_reason
from benchmarks.comparison.engines.convoy_baseline import BaselineWorker
from benchmarks.comparison.engines.convoy_inproc import ConvoyEngine
from benchmarks.comparison.engines.llamacpp import batched_bench, gguf, python_batched
from benchmarks.comparison.machine import Target
from benchmarks.comparison.results import Cell, EngineError
from benchmarks.comparison.workloads import SHARED_PREFIX, Workloads
from convoy.bench import roofline
from convoy.bench.workloads import BenchRequest
from convoy.model.linear import SKINNY_MAX_ROWS

UNLIMITED_TOKENS = 10**9
# convoy with greedy_screening=False: the whole head in float32 for greedy rows too.
NO_SCREEN = "convoy, no greedy screen"
NO_PREFIX_CACHE = "convoy, no prefix cache"

# A workload's roofline bound in seconds as a function of the machine's measured peaks.
BoundFn = Callable[[dict[str, float]], float]
RunFn = Callable[[Sequence[BenchRequest]], RunResult]


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


@dataclass(frozen=True)
class JobContext:
    """What every engine's rows are laid out from: the command line, the model, the
    workloads."""

    args: argparse.Namespace
    model_dir: Path
    workloads: Workloads
    shape: roofline.ModelShape

    @property
    def target(self) -> Target:
        target: Target = self.args.target
        return target

    @property
    def prec(self) -> str:
        return self.target.label

    def bound(self, reqs: Sequence[BenchRequest], nbytes: int, seqs: int, toks: int) -> BoundFn:
        return lambda pk: bound_seconds(self.shape, pk, reqs, nbytes, seqs, toks)

    def job(self, workload: str, adapter: PeerAdapter, config: str, bound: BoundFn | None) -> Job:
        """``adapter`` on ``workload``; a row saying why when it is unavailable."""
        conc, reqs = self.workloads[workload]
        reason = adapter.unavailable()
        if reason is not None:
            return self.not_run_job(workload, adapter.name, config, reason)
        return Job(Cell(workload, adapter.name, config, conc), reqs, adapter.run, bound)

    def not_run_job(self, workload: str, engine: str, config: str, reason: str) -> Job:
        conc, reqs = self.workloads[workload]
        return Job(Cell(workload, engine, config, conc, not_run=reason), reqs, None)

    def not_run(self, engine: str, config: str, reason: str) -> list[Job]:
        """One row per workload for an engine that does not run, saying why."""
        return [self.not_run_job(w, engine, config, reason) for w in self.workloads]


JobsFn = Callable[[JobContext], list[Job]]


def loading(engine: str, config: str | None = None) -> Callable[[JobsFn], JobsFn]:
    """An engine's rows, or, where loading it raises, one row per workload saying so
    (``config``: the precision of this run unless given)."""

    def wrap(fn: JobsFn) -> JobsFn:
        @functools.wraps(fn)
        def jobs(ctx: JobContext) -> list[Job]:
            try:
                return fn(ctx)
            except Exception as e:
                traceback.print_exc()
                reason = f"failed to load: {type(e).__name__}: {e}"
                return ctx.not_run(engine, config or ctx.prec, reason)

        return jobs

    return wrap


# ---------------------------------------------------------------------------------------------
# convoy: in this process, and from a baseline checkout
# ---------------------------------------------------------------------------------------------


def convoy_plan(ctx: JobContext, screening: bool = True) -> list[tuple[int, list[str]]]:
    """convoy's engines as (``max_num_seqs``, the workloads it runs).

    One engine for every request of the largest workload at once runs every workload; at most
    ``SKINNY_MAX_ROWS`` streams convoy keeps its weights in the plain layout its matrix-vector
    kernel reads (``linear_backend=auto``), so on the CPU a second engine configured for that
    runs the ``c=N`` workloads with ``N <= SKINNY_MAX_ROWS``, as the peers' rows are configured
    for the concurrency. Without the greedy screen, ``shared-prefix`` is left out: that
    baseline's point is the head, shown on the others.
    """
    largest = max(len(r) for _, r in ctx.workloads.values())
    names = [w for w in ctx.workloads if screening or w != SHARED_PREFIX]
    plan = [(max(largest, ctx.args.convoy_max_num_seqs), names)]
    few = SKINNY_MAX_ROWS
    small = [w for w, (c, _) in ctx.workloads.items() if c is not None and c <= few]
    if ctx.target.device == "cpu" and small:
        plan.append((few, small))
    return plan


def convoy_rows(ctx: JobContext, engine: str, screening: bool) -> tuple[ConvoyEngine, list[Job]]:
    """The rows of :func:`convoy_plan`, each engine loaded here; the first engine too."""
    engines, jobs = [], []
    for seqs, names in convoy_plan(ctx, screening):
        conv = ConvoyEngine(
            ctx.model_dir, seqs, greedy_screening=screening, target=ctx.target, name=engine
        )
        engines.append(conv)
        cfg = f"{ctx.prec}, max_num_seqs={conv.max_num_seqs}"
        for w in names:
            reqs = ctx.workloads[w][1]
            nbytes = ctx.target.dtype_bytes
            b = ctx.bound(reqs, nbytes, conv.max_num_seqs, conv.max_num_batched_tokens)
            jobs.append(ctx.job(w, conv, cfg, b))
    return engines[0], jobs


@loading("convoy")
def convoy_jobs(ctx: JobContext) -> list[Job]:
    """convoy's rows; with ``--screen-baseline`` their twins with the greedy screen off (what
    the screen buys; the tokens are the same), and on ``shared-prefix`` the same engine with
    its prefix cache off (what caching buys there)."""
    conv, jobs = convoy_rows(ctx, "convoy", screening=True)
    if conv.screened and ctx.args.screen_baseline:
        jobs += convoy_rows(ctx, NO_SCREEN, screening=False)[1]
    if SHARED_PREFIX in ctx.workloads:
        _, reqs = ctx.workloads[SHARED_PREFIX]
        off = ConvoyEngine(
            ctx.model_dir,
            conv.max_num_seqs,
            prefix_caching=False,
            target=ctx.target,
            name=NO_PREFIX_CACHE,
        )
        cfg = f"{ctx.prec}, max_num_seqs={off.max_num_seqs}, enable_prefix_caching=False"
        b = ctx.bound(reqs, ctx.target.dtype_bytes, off.max_num_seqs, off.max_num_batched_tokens)
        jobs.append(ctx.job(SHARED_PREFIX, off, cfg, b))
    return jobs


def baseline_jobs(ctx: JobContext) -> list[Job]:
    """With ``--baseline-checkout``: convoy's rows again, run by that checkout."""
    return [] if ctx.args.baseline_checkout is None else _baseline_rows(ctx)


@loading(convoy_baseline.NAME)
def _baseline_rows(ctx: JobContext) -> list[Job]:
    jobs = []
    for seqs, names in convoy_plan(ctx):
        engine = {
            "model": str(ctx.model_dir),
            "device": ctx.target.device,
            "dtype": ctx.target.dtype,
            "max_num_seqs": seqs,
            "enable_prefix_caching": True,
            "greedy_screening": True,
        }
        args = ctx.args
        worker = BaselineWorker(
            args.baseline_checkout, engine, args.threads, args.cache_dir, args.peer_timeout
        )
        cfg = f"{ctx.prec}, max_num_seqs={worker.max_num_seqs}"
        toks = worker.max_num_batched_tokens
        for w in names:
            reqs = ctx.workloads[w][1]
            b = None
            if toks is not None:
                b = ctx.bound(reqs, ctx.target.dtype_bytes, worker.max_num_seqs, toks)
            jobs.append(ctx.job(w, worker, cfg, b))
    return jobs


# ---------------------------------------------------------------------------------------------
# transformers, in this process
# ---------------------------------------------------------------------------------------------


@loading(hf_static.NAME)
def hf_static_jobs(ctx: JobContext) -> list[Job]:
    """One batch of ``c`` on ``c=N``; each of ``--hf-batch-sizes`` on the others."""
    hf = hf_static.HFStaticEngine(ctx.model_dir, ctx.target)
    jobs = []
    for w, (conc, reqs) in ctx.workloads.items():
        for bs in [conc] if conc is not None else ctx.args.hf_batch_sizes:
            b = ctx.bound(reqs, ctx.target.dtype_bytes, bs, UNLIMITED_TOKENS)
            jobs.append(ctx.job(w, hf_static.HFStatic(hf, bs), f"{ctx.prec}, batch={bs}", b))
    return jobs


@loading(hf_cb.NAME)
def hf_cb_jobs(ctx: JobContext) -> list[Job]:
    """``max_requests_per_batch`` = ``c`` on ``c=N``, every request on the others."""
    if not hf_cb.has_generate_batch():
        raise EngineError("this transformers has no generate_batch")
    cb = hf_cb.HFContinuousEngine(ctx.model_dir, ctx.target)
    jobs = []
    for w, (conc, reqs) in ctx.workloads.items():
        cap = conc if conc is not None else len(reqs)
        b = ctx.bound(reqs, ctx.target.dtype_bytes, cap, UNLIMITED_TOKENS)
        cfg = f"{ctx.prec}, max_requests_per_batch={cap}"
        jobs.append(ctx.job(w, hf_cb.HFContinuous(cb, cap), cfg, b))
    return jobs


# ---------------------------------------------------------------------------------------------
# llama.cpp and vLLM, in their own interpreters (CPU only)
# ---------------------------------------------------------------------------------------------


def _llama_cpp_source(ctx: JobContext) -> tuple[Path | None, str | None]:
    """(llama.cpp's sources, ``None``), or (``None``, why there are none)."""
    try:
        return gguf.find_llama_cpp_dir(ctx.args.llama_cpp_dir, ctx.args.cache_dir), None
    except Exception as e:
        return None, f"not run: no llama.cpp converter ({type(e).__name__}: {e})"


def _gguf(ctx: JobContext, outtype: str, llama_dir: Path | None) -> tuple[Path | None, str | None]:
    """(the GGUF of ``outtype``, ``None``), or (``None``, why it could not be converted)."""
    if llama_dir is None:
        return None, None
    try:
        print(f"converting to GGUF {outtype} ...", flush=True)
        return gguf.ensure_gguf(ctx.model_dir, outtype, llama_dir), None
    except Exception as e:
        return None, f"not run: {e}"


@loading(llamacpp.NAME, "f32")
def llamacpp_jobs(ctx: JobContext) -> list[Job]:
    """Per GGUF type and workload: llama-cpp-python batched (one row per
    ``--llamacpp-parallel`` on ``random``, ``n_parallel = c`` on ``c=N``), then
    ``llama-batched-bench`` (all of the workload's requests at once, fixed prompt length)."""
    reason = cpu_peer_reason(ctx.target)
    if reason is not None:
        return ctx.not_run(llamacpp.NAME, "f32", reason)
    py_reason = python_batched.llamacpp_status(ctx.args.llamacpp_python)
    bench_bin = Path(ctx.args.llamacpp_tools_dir) / "llama-batched-bench"
    bench_reason = batched_bench.llamacpp_tools_status(bench_bin)
    llama_dir, convert_reason = None, None
    if py_reason is None or bench_reason is None:
        llama_dir, convert_reason = _llama_cpp_source(ctx)
    jobs = []
    for outtype in ctx.args.gguf_types:
        path, why = _gguf(ctx, outtype, llama_dir)
        why = convert_reason or why
        for w in ctx.workloads:
            jobs += _llamacpp_python_jobs(ctx, w, outtype, path, why or py_reason)
            jobs.append(_batched_bench_job(ctx, w, outtype, path, why or bench_reason, bench_bin))
    return jobs


def _llamacpp_python_jobs(
    ctx: JobContext, workload: str, outtype: str, path: Path | None, reason: str | None
) -> list[Job]:
    conc, reqs = ctx.workloads[workload]
    pars = (
        [conc]
        if conc is not None
        else sorted({min(p, len(reqs)) for p in ctx.args.llamacpp_parallel})
    )
    jobs = []
    for par in pars:
        cfg = python_batched.config(outtype, par)
        if reason is not None or path is None:
            why = reason or "not run: no GGUF"
            jobs.append(ctx.not_run_job(workload, llamacpp.NAME, cfg, why))
            continue
        args = ctx.args
        adapter = python_batched.LlamaCppBatched(
            args.llamacpp_python, path, args.threads, par, args.peer_timeout
        )
        nbytes = gguf.GGUF_DTYPE_BYTES[outtype]
        b = ctx.bound(reqs, nbytes, par, llamacpp.LLAMACPP_N_BATCH)
        jobs.append(ctx.job(workload, adapter, cfg, b))
    return jobs


def _batched_bench_job(
    ctx: JobContext,
    workload: str,
    outtype: str,
    path: Path | None,
    reason: str | None,
    bench_bin: Path,
) -> Job:
    """One ``llama-batched-bench`` row: B = every request of the workload at once, PP = their
    mean prompt length, TG = the output length; output tok/s = B * TG / T."""
    reqs = ctx.workloads[workload][1]
    shape = batched_bench.BenchShape.of(reqs)
    cfg = shape.config(outtype)
    if reason is None and path is None:
        reason = "not run: no GGUF"
    if reason is None and workload == SHARED_PREFIX:
        reason = "not run: llama-batched-bench has no shared-prefix + own-suffix prompts"
    if reason is None and len({r.output_len for r in reqs}) != 1:
        reason = "not run: llama-batched-bench needs one output length"
    if reason is not None or path is None:
        return ctx.not_run_job(workload, llamacpp.NAME, cfg, reason or "not run: no GGUF")
    adapter = batched_bench.BatchedBench(
        bench_bin, path, shape, ctx.args.threads, ctx.args.peer_timeout
    )
    nbytes = gguf.GGUF_DTYPE_BYTES[outtype]
    b = ctx.bound(shape.fixed_requests(), nbytes, shape.n_seqs, batched_bench.BATCHED_BENCH_N_BATCH)
    return ctx.job(workload, adapter, cfg, b)


@loading(vllm_cpu.NAME, "f32")
def vllm_jobs(ctx: JobContext) -> list[Job]:
    """``max_num_seqs`` = every request (``random``) or ``c``, float32."""
    args = ctx.args
    reason = cpu_peer_reason(ctx.target) or vllm_cpu.vllm_status(args.vllm_python)
    if reason is not None:
        return ctx.not_run(vllm_cpu.NAME, "f32", reason)
    env = vllm_cpu.vllm_env(args.threads, args.vllm_kvcache_gib)
    jobs = []
    for w, (conc, reqs) in ctx.workloads.items():
        seqs = conc if conc is not None else max(len(reqs), 1)
        adapter = vllm_cpu.VllmCpu(args.vllm_python, ctx.model_dir, seqs, env, args.peer_timeout)
        b = ctx.bound(reqs, 4, seqs, UNLIMITED_TOKENS)
        cfg = f"f32, max_num_seqs={seqs}, KV cache {args.vllm_kvcache_gib} GiB"
        jobs.append(ctx.job(w, adapter, cfg, b))
    return jobs


# --engines name -> the functions laying out its rows, in report order.
ENGINE_JOBS: dict[str, tuple[JobsFn, ...]] = {
    "convoy": (convoy_jobs, baseline_jobs),
    "hf-static": (hf_static_jobs,),
    "hf-cb": (hf_cb_jobs,),
    "llamacpp": (llamacpp_jobs,),
    "vllm": (vllm_jobs,),
}


def build_jobs(
    args: argparse.Namespace,
    model_dir: Path,
    workloads: Workloads,
    shape: roofline.ModelShape,
    peaks: dict[str, float],
) -> list[Job]:
    """Load every requested engine and lay out one :class:`Job` per (workload, config), each
    cell's bound at the peaks measured at the start (``peaks``)."""
    ctx = JobContext(args, model_dir, workloads, shape)
    jobs = [
        j for name, fns in ENGINE_JOBS.items() if name in args.engines for f in fns for j in f(ctx)
    ]
    for job in jobs:
        if job.bound is not None:
            job.cell.bound_s = job.bound(peaks)
    return jobs
