"""benchmarks/compare.py and its benchmarks/comparison package: the arithmetic and table logic
(no engine is run).

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from convoy.bench import roofline
from convoy.bench.workloads import BenchRequest


def _load_compare() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("benchmarks_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


compare = _load_compare()  # puts the repository on sys.path, for benchmarks.comparison

from benchmarks.comparison import interleave, jobs, paths, report, results  # noqa: E402
from benchmarks.comparison.engines import vllm_cpu  # noqa: E402
from benchmarks.comparison.engines.llamacpp import batched_bench  # noqa: E402


def test_median_or_none() -> None:
    assert results.median_or_none([]) is None
    assert results.median_or_none([3.0, 1.0, 2.0]) == 2.0
    assert results.median_or_none([1.0, 2.0, 3.0, 10.0]) == 2.5  # (2 + 3) / 2


def test_ratio() -> None:
    assert results.ratio(300.0, 150.0) == 2.0
    assert results.ratio(None, 150.0) is None
    assert results.ratio(300.0, None) is None
    assert results.ratio(300.0, 0.0) is None


def test_fraction_of_bound() -> None:
    assert results.fraction_of_bound(1.0, 4.0) == 0.25
    with pytest.raises(ValueError):
        results.fraction_of_bound(1.0, 0.0)


def test_cell_medians_and_pct_of_bound() -> None:
    cell = results.Cell("random", "convoy", "f32")
    assert cell.median_tps is None and cell.pct_of_bound is None
    # 100 tokens in 1, 2 and 4 s: 100, 50, 25 tok/s -> median 50; median elapsed 2 s.
    cell.runs = [results.Run(1.0, 100), results.Run(2.0, 100), results.Run(4.0, 100)]
    cell.bound_s = 0.5
    assert cell.median_tps == 50.0
    assert cell.median_elapsed_s == 2.0
    assert cell.pct_of_bound == 25.0  # 0.5 s / 2 s


def test_pct_of_bound_takes_each_run_at_its_own_peaks() -> None:
    # Start-of-run bound 0.5 s; the runs' own bounds 0.8, 0.6, 1.0 s over 1, 2, 4 s:
    # 80%, 30%, 25% -> median 30%. Against the start bound: 0.5 / 2 (median time) = 25%.
    runs = [results.Run(1.0, 100, 0.8), results.Run(2.0, 100, 0.6), results.Run(4.0, 100, 1.0)]
    cell = results.Cell("random", "convoy", "f32", runs=runs, bound_s=0.5)
    assert cell.pct_of_bound == pytest.approx(30.0)
    assert cell.pct_of_start_bound == pytest.approx(25.0)
    # One run without its own peaks: every run falls back to the start-of-run bound.
    cell.runs.append(results.Run(2.0, 100))
    assert cell.pct_of_bound == cell.pct_of_start_bound == pytest.approx(25.0)


def test_run_jobs_measures_peaks_before_every_run() -> None:
    # A bound that is 1 s at 100 GFLOP/s and scales with 1 / peak; the "machine" measures 100
    # then 200 GFLOP/s, and each run takes 2 s: 50% of bound, then 25%.
    measured = iter([100.0, 200.0])

    def peaks_now() -> dict[str, float]:
        return {"peak_gflops": next(measured), "bandwidth_gbs": 10.0}

    cell = results.Cell("random", "convoy", "f32", bound_s=1.0)
    reqs = [BenchRequest([1], 4)]
    job = jobs.Job(cell, reqs, lambda r: (2.0, [4]), lambda pk: 100.0 / pk["peak_gflops"])
    interleave.run_jobs([job], 2, peaks_now)
    assert [r.bound_s for r in cell.runs] == [1.0, 0.5]
    assert [r.peaks["peak_gflops"] for r in cell.runs if r.peaks] == [100.0, 200.0]
    assert cell.pct_of_bound == pytest.approx(37.5)  # median of 50% and 25%
    assert report.per_run_peaks_lines([cell]) == [
        "- measured again before each of the 2 runs: matmul peak 100.0-200.0 GFLOP/s (median "
        "150.0), bandwidth 10.0-10.0 GB/s (median 10.0); each run's bound is taken at its own"
    ]
    # Without a measuring function the runs keep no peaks and the start bound counts.
    plain = results.Cell("random", "convoy", "f32", bound_s=1.0)
    interleave.run_jobs([jobs.Job(plain, reqs, lambda r: (2.0, [4]))], 1)
    assert plain.runs[0].bound_s is None and plain.pct_of_bound == 50.0
    assert report.per_run_peaks_lines([plain]) == []


def test_check_lengths() -> None:
    reqs = [BenchRequest([1, 2], 3), BenchRequest([4], 2)]
    results.check_lengths([3, 2], reqs)
    with pytest.raises(results.EngineError, match="1 of 2"):
        results.check_lengths([3, 1], reqs)


def test_markdown_table_ratio_best_and_not_run() -> None:
    convoy = results.Cell("random", "convoy", "f32", runs=[results.Run(1.0, 200)])
    small = results.Cell("random", "hf", "batch=16", runs=[results.Run(1.0, 50)])
    big = results.Cell("random", "hf", "batch=64", runs=[results.Run(1.0, 100)])
    skipped = results.Cell("random", "vllm", "-", not_run="not run: not installed")
    table = report.markdown_table([convoy, small, big, skipped])
    rows = table.splitlines()[2:]
    assert "| convoy* |" in rows[0]
    assert "| hf | batch=16 |" in rows[1] and "| 4.00 |" in rows[1]  # 200 / 50
    assert "| hf* | batch=64 |" in rows[2] and "| 2.00 |" in rows[2]  # 200 / 100, best
    assert rows[3].endswith("| not run: not installed |")


def test_markdown_table_one_best_across_llamacpp_kinds() -> None:
    # llama-cpp-python batched and llama-batched-bench rows share the engine "llama.cpp":
    # one `*` per workload, on the faster of the two.
    convoy = results.Cell("c=4", "convoy", "f32", 4, runs=[results.Run(1.0, 400)])
    py = results.Cell("c=4", "llama.cpp", "f32, python batched", 4, runs=[results.Run(1.0, 100)])
    bb = results.Cell("c=4", "llama.cpp", "f32, batched-bench", 4, runs=[results.Run(1.0, 200)])
    rows = report.markdown_table([convoy, py, bb]).splitlines()[2:]
    assert "| llama.cpp | f32, python batched |" in rows[1] and "| 4.00 |" in rows[1]
    assert "| llama.cpp* | f32, batched-bench |" in rows[2] and "| 2.00 |" in rows[2]


def test_mean_input_len() -> None:
    reqs = [BenchRequest([1] * 10, 4), BenchRequest([1] * 13, 4)]
    assert batched_bench.mean_input_len(reqs) == 12  # 11.5 rounds half to even: 12
    assert batched_bench.mean_input_len([*reqs, BenchRequest([1] * 13, 4)]) == 12  # 36 / 3
    with pytest.raises(ValueError):
        batched_bench.mean_input_len([])


def test_batched_bench_ctx() -> None:
    # 64 sequences of 160 + 128 = 288 tokens: each slot padded to 512 -> 32768.
    assert batched_bench.batched_bench_ctx(64, 160, 128) == 64 * 512
    # 4 sequences of 100 + 156 = 256 exactly: no padding.
    assert batched_bench.batched_bench_ctx(4, 100, 156) == 1024


REPO = Path(__file__).resolve().parents[2]
LLAMACPP_PYTHON = Path(paths.LLAMACPP_PYTHON.get())
LLAMACPP_SRC = sorted(
    (REPO / "bench-results" / "models" / "llama-cpp-sdist").glob(
        "llama_cpp_python-*/vendor/llama.cpp"
    )
)


def _run_llamacpp(tmp: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    inp, out = tmp / f"{name}.in.json", tmp / f"{name}.out.json"
    inp.write_text(json.dumps(spec))
    runner = REPO / "benchmarks" / "peers" / "llamacpp_runner.py"
    proc = subprocess.run(
        [str(LLAMACPP_PYTHON), str(runner), str(inp), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["error"] is None, (result, proc.stderr[-2000:])
    return dict(result)


@pytest.mark.slow
@pytest.mark.skipif(
    not LLAMACPP_PYTHON.exists() or not LLAMACPP_SRC,
    reason="needs llama-cpp-python's venv and its sdist's llama.cpp (benchmarks/compare.py)",
)
def test_llamacpp_batched_runner_matches_one_sequence_runner(tmp_path: Path) -> None:
    """The batched C-API runner's greedy tokens equal the high-level one-sequence runner's.

    convoy-tiny (a trained model: varied tokens, unlike a random checkpoint's repeats) as an
    f32 GGUF; prompts of 20..700 real tokens with output lengths 5..40, so that with
    ``n_parallel=3`` and ``n_batch=128`` long prompts are prefilled in chunks next to other
    sequences' decode steps, finished sequences free their KV slot for waiting requests, and
    with ``n_parallel=7`` every request runs at once.
    """
    from transformers import AutoTokenizer

    model = REPO / "convoy" / "assets" / "convoy-tiny"
    gguf = tmp_path / "tiny.f32.gguf"
    subprocess.run(
        [
            *(sys.executable, str(REPO / "benchmarks" / "peers" / "convert_gguf.py")),
            *(str(LLAMACPP_SRC[-1]), str(model), str(gguf), "f32"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    tok = AutoTokenizer.from_pretrained(str(model))
    text = "".join(p.read_text() for p in sorted((REPO / "convoy").rglob("*.py")))
    ids = tok(text)["input_ids"]
    shape = [(20, 24), (700, 10), (45, 40), (130, 24), (300, 17), (64, 30), (33, 5)]
    assert len(ids) >= 1000 * len(shape)
    requests = [
        {"prompt_token_ids": ids[1000 * i : 1000 * i + n_in], "output_len": n_out}
        for i, (n_in, n_out) in enumerate(shape)
    ]
    base = {"model": str(gguf), "requests": requests, "n_threads": 2, "return_tokens": True}
    ref = _run_llamacpp(tmp_path, "seq", {**base, "mode": "sequential", "n_batch": 512})
    assert ref["output_lens"] == [n_out for _, n_out in shape]
    assert len({tuple(t) for t in ref["tokens"]}) == len(shape)  # the check is not vacuous
    for par in (3, 7):
        got = _run_llamacpp(
            tmp_path, f"b{par}", {**base, "mode": "batched", "n_parallel": par, "n_batch": 128}
        )
        assert got["output_lens"] == ref["output_lens"]
        assert got["tokens"] == ref["tokens"], f"n_parallel={par}"


# Captured from llama-batched-bench (llama.cpp vendored by llama-cpp-python 0.3.36) on this
# repo's 25m random checkpoint, f32 GGUF, 2 threads:
#   llama-batched-bench -m llama-25m-random.f32.gguf -c 1024 -b 2048 -ub 512 -npp 32 -ntg 16
#       -npl 1,4 -t 2 -tb 2
BATCHED_BENCH_SAMPLE = """
llama_batched_bench: n_kv_max = 1024, n_batch = 2048, n_ubatch = 512, flash_attn = -1, \
is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |     16 |    1 |     48 |    0.070 |   459.41 |    0.316 |    50.64 |    0.386 |   124.47 |
|    32 |     16 |    4 |    192 |    0.116 |  1106.86 |    1.409 |    45.41 |    1.525 |   125.89 |
"""


def test_parse_batched_bench_captured_table() -> None:
    rows = batched_bench.parse_batched_bench(BATCHED_BENCH_SAMPLE)
    assert len(rows) == 2  # the header, the |---| line and the log line are skipped
    one, four = rows
    assert (one.pp, one.tg, one.b, one.n_kv) == (32, 16, 1, 48)
    assert (one.t_pp_s, one.s_pp, one.t_tg_s, one.s_tg) == (0.070, 459.41, 0.316, 50.64)
    assert (four.t_s, four.s) == (1.525, 125.89)
    # Output tokens/s = B * TG / T: 4 * 16 / 1.525 = 41.97 (S_TG, 45.41, leaves out T_PP).
    assert four.output_tokens_per_s == pytest.approx(64 / 1.525)
    assert one.output_tokens_per_s == pytest.approx(16 / 0.386)
    assert batched_bench.batched_bench_row(rows, 32, 16, 4) is four


def test_batched_bench_row_missing() -> None:
    rows = batched_bench.parse_batched_bench(BATCHED_BENCH_SAMPLE)
    with pytest.raises(results.EngineError, match=r"no row for PP=32 TG=16 B=64"):
        batched_bench.batched_bench_row(rows, 32, 16, 64)
    assert batched_bench.parse_batched_bench("error: unable to load model\n") == []


def test_vllm_env() -> None:
    env = vllm_cpu.vllm_env(2, 4)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert vllm_cpu.vllm_env(1, 1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_ratios_use_convoys_best_config() -> None:
    # Two convoy configs on one workload: peers are compared with the faster one.
    slow = results.Cell("c=1", "convoy", "max_num_seqs=4", 1, runs=[results.Run(1.0, 300)])
    fast = results.Cell("c=1", "convoy", "max_num_seqs=128", 1, runs=[results.Run(1.0, 400)])
    peer = results.Cell("c=1", "vllm-cpu", "f32", 1, runs=[results.Run(1.0, 100)])
    rows = report.markdown_table([fast, slow, peer]).splitlines()[2:]
    assert "| 4.00 |" in rows[2]  # 400 / 100, not 300 / 100


def test_summary_table_best_per_engine_and_llamacpp_weight_type() -> None:
    cells = [
        results.Cell("random", "convoy", "f32", runs=[results.Run(2.0, 400)], bound_s=1.0),
        results.Cell("random", "hf", "batch=16", runs=[results.Run(1.0, 50)]),
        results.Cell("random", "hf", "batch=64", runs=[results.Run(1.0, 100)]),
        results.Cell("random", "llama.cpp", "f32, python", runs=[results.Run(1.0, 80)]),
        results.Cell("random", "llama.cpp", "f32, bench", runs=[results.Run(1.0, 160)]),
        results.Cell("random", "llama.cpp", "f16, bench", runs=[results.Run(1.0, 400)]),
        results.Cell("random", "vllm", "-", not_run="not installed"),
    ]
    header, _, row = report.summary_table(cells).splitlines()
    assert header == "| workload | convoy | hf | llama.cpp f32 | llama.cpp f16 | vllm |"
    # convoy: 400 tokens in 2 s = 200 tok/s, bound 1 s of 2 s = 50 %; hf best 100 -> 2.00x;
    # llama.cpp f32 best 160 -> 1.25x; f16 400 -> 0.50x.
    assert row == (
        "| random | **200.0** (50% of bound) | 100.0 (2.00x) | 160.0 (1.25x) "
        "| 400.0 (0.50x) | not run |"
    )


def test_render_rebuilds_the_report_from_saved_json(tmp_path: Path) -> None:
    cell = results.Cell("random", "convoy", "f32", runs=[results.Run(2.0, 400)], bound_s=1.0)
    saved = tmp_path / "compare-x.json"
    saved.write_text(json.dumps({"cells": [cell.to_dict()], "report_header": ["# head", ""]}))
    cells = report.cells_from_json(saved)
    assert [c.median_tps for c in cells] == [200.0]
    assert cells[0].pct_of_bound == 50.0
    # Per-run bounds and peaks survive the round trip.
    run = results.Run(2.0, 400, 1.5, {"peak_gflops": 150.0, "bandwidth_gbs": 30.0})
    cell = results.Cell("random", "convoy", "f32", runs=[run], bound_s=1.0)
    saved.write_text(json.dumps({"cells": [cell.to_dict()], "report_header": []}))
    (back,) = report.cells_from_json(saved)
    assert back.runs == [run]
    assert back.pct_of_bound == 75.0 and back.pct_of_start_bound == 50.0


def test_convoy_jobs_include_the_no_screen_baseline(
    make_checkpoint: Callable[..., Path],
) -> None:
    """Where convoy screens greedy rows, every convoy row gets a twin with the screen off (its
    own column), with --screen-baseline (the tokens are the same either way:
    tests/model/test_greedy_head.py)."""
    from convoy.model.greedy_head import screen_kind

    path = make_checkpoint("llama")
    shape = roofline.ModelShape.from_dict(json.loads((path / "config.json").read_text()))
    reqs = [BenchRequest([5 + i, 6, 7], 4) for i in range(3)]
    workloads = {"random": (None, reqs), "c=1": (1, reqs[:1])}
    peaks = {"bandwidth_gbs": 30.0, "peak_gflops": 200.0}

    def cells(*flags: str) -> list[tuple[str, str, str]]:
        args = compare.parse_args(["--engines", "convoy", *flags])
        built = jobs.build_jobs(args, path, workloads, shape, peaks)
        return [(j.cell.workload, j.cell.engine, j.cell.config) for j in built]

    with_twin = cells("--screen-baseline")
    convoy_rows = [
        ("random", "convoy", "f32, max_num_seqs=128"),
        ("c=1", "convoy", "f32, max_num_seqs=128"),
        ("c=1", "convoy", "f32, max_num_seqs=4"),
    ]
    twins = [(w, jobs.NO_SCREEN, c) for w, _, c in convoy_rows]
    assert with_twin == (convoy_rows + twins if screen_kind() else convoy_rows)
    assert cells() == convoy_rows


def test_peer_paths_default_to_env_vars_else_repo_relative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No machine's layout in the code: each peer path is its environment variable when set,
    else a path under the repository's bench-results/peers."""
    for default in paths.ALL:
        monkeypatch.delenv(default.env, raising=False)
    args = compare.parse_args([])
    home = REPO / "bench-results" / "peers"
    assert args.llamacpp_python == str(home / "llamacpp" / "bin" / "python")
    assert args.llamacpp_tools_dir == str(home / "llamacpp-build" / "bin")
    assert args.vllm_python == str(home / "vllm" / "bin" / "python")
    assert args.llama_cpp_dir is None  # llama-cpp-python's sdist under --cache-dir
    assert paths.LLAMACPP_BUILD_LOG.get() == home / "llamacpp-build.log"

    monkeypatch.setenv("CONVOY_LLAMACPP_PYTHON", str(tmp_path / "l" / "python"))
    monkeypatch.setenv("CONVOY_LLAMACPP_DIR", str(tmp_path / "src"))
    monkeypatch.setenv("CONVOY_LLAMACPP_TOOLS_DIR", str(tmp_path / "bin"))
    monkeypatch.setenv("CONVOY_VLLM_PYTHON", str(tmp_path / "v" / "python"))
    args = compare.parse_args([])
    assert args.llamacpp_python == str(tmp_path / "l" / "python")
    assert args.llama_cpp_dir == tmp_path / "src"
    assert args.llamacpp_tools_dir == str(tmp_path / "bin")
    assert args.vllm_python == str(tmp_path / "v" / "python")
    # A flag still wins over its variable.
    assert compare.parse_args(["--vllm-python", "py"]).vllm_python == "py"


def test_no_machine_paths_in_benchmarks() -> None:
    bench = REPO / "benchmarks"
    files = [*bench.rglob("*.py"), *bench.rglob("*.sh")]
    hits = [
        f"{f.relative_to(REPO)}:{n}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if any(p in line for p in ("/work/", "/opt/", "/tmp/", "/root/"))
    ]
    assert hits == []


def test_baseline_checkout_is_checked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        compare.parse_args(["--baseline-checkout", str(tmp_path)])  # no convoy/ there
    with pytest.raises(SystemExit):
        compare.parse_args(["--engines", "hf-static", "--baseline-checkout", str(REPO)])
    args = compare.parse_args(["--engines", "convoy", "--baseline-checkout", str(REPO)])
    assert args.baseline_checkout == REPO


class FakeBaseline:
    """A stand-in for the baseline checkout's subprocess: records its configuration."""

    name = "convoy@baseline"
    started: list[dict[str, Any]] = []  # noqa: RUF012

    def __init__(
        self, checkout: Path, engine: dict[str, Any], threads: Any, cache: Path, t: float
    ) -> None:
        self.max_num_seqs = engine["max_num_seqs"]
        self.max_num_batched_tokens = 2048
        FakeBaseline.started.append(engine)

    def unavailable(self) -> str | None:
        return None

    def run(self, requests: Any) -> tuple[float, list[int]]:
        raise AssertionError("replaced in the test")


def test_baseline_jobs_mirror_convoys_and_interleave(
    make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--baseline-checkout: every convoy row gets a convoy@baseline row of the same config and
    workload, right after convoy's, and repeat k of every row runs before repeat k + 1."""
    path = make_checkpoint("llama")
    shape = roofline.ModelShape.from_dict(json.loads((path / "config.json").read_text()))
    reqs = [BenchRequest([5 + i, 6, 7], 4) for i in range(3)]
    workloads = {"random": (None, reqs), "c=1": (1, reqs[:1])}
    peaks = {"bandwidth_gbs": 30.0, "peak_gflops": 200.0}
    monkeypatch.setattr(jobs, "BaselineWorker", FakeBaseline)
    FakeBaseline.started.clear()
    args = compare.parse_args(["--engines", "convoy", "--baseline-checkout", str(REPO)])
    built = jobs.build_jobs(args, path, workloads, shape, peaks)
    rows = [(j.cell.workload, j.cell.engine, j.cell.config) for j in built]
    convoy_rows = [
        ("random", "convoy", "f32, max_num_seqs=128"),
        ("c=1", "convoy", "f32, max_num_seqs=128"),
        ("c=1", "convoy", "f32, max_num_seqs=4"),
    ]
    assert rows == convoy_rows + [(w, "convoy@baseline", c) for w, _, c in convoy_rows]
    assert [e["max_num_seqs"] for e in FakeBaseline.started] == [128, 4]
    assert all(j.cell.bound_s is not None for j in built)

    order: list[int] = []

    def recorder(i: int) -> Callable[[Any], tuple[float, list[int]]]:
        def run(r: Any) -> tuple[float, list[int]]:
            order.append(i)
            return 1.0, [x.output_len for x in r]

        return run

    for i, job in enumerate(built):
        job.run = recorder(i)
    interleave.run_jobs(built, 2)
    assert order == [*range(6), *range(6)]
    assert [len(j.cell.runs) for j in built] == [2] * 6


@pytest.mark.slow
def test_baseline_checkout_runs_a_real_job(
    make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real convoy@baseline run, the working tree itself as the "other" checkout: a
    subprocess with PYTHONPATH=REPO times the workload with run_throughput, run after run on
    one loaded engine. The C++ kernels are off (a fresh extensions folder would build them)."""
    monkeypatch.setenv("CONVOY_CPU_KERNELS", "0")
    path = make_checkpoint("llama")
    shape = roofline.ModelShape.from_dict(json.loads((path / "config.json").read_text()))
    reqs = [BenchRequest([5 + i, 6, 7], 4) for i in range(3)]
    args = compare.parse_args(
        ["--engines", "convoy", "--baseline-checkout", str(REPO), "--cache-dir", str(tmp_path)]
    )
    peaks = {"bandwidth_gbs": 30.0, "peak_gflops": 200.0}
    built = jobs.build_jobs(args, path, {"random": (None, reqs)}, shape, peaks)
    baseline = [j for j in built if j.cell.engine == "convoy@baseline"]
    assert [j.cell.config for j in baseline] == ["f32, max_num_seqs=128"]
    assert baseline[0].cell.not_run is None and baseline[0].cell.bound_s is not None
    interleave.run_jobs(baseline, 2)
    cell = baseline[0].cell
    assert cell.not_run is None and len(cell.runs) == 2
    assert [r.num_output_tokens for r in cell.runs] == [12, 12]  # 3 requests x 4 tokens
