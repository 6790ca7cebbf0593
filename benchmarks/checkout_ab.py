"""convoy from two source checkouts, each engine in its own process, runs alternating.

``compare.py --baseline-checkout`` runs the baseline in a subprocess beside the in-process
convoy, which shares its process with the run's other convoy engines; this puts both sides in
processes of their own, so neither pays for the other, and alternates which goes first::

    git worktree add ../convoy-base <older commit>
    .venv/bin/python benchmarks/checkout_ab.py --before ../convoy-base --model-size 200m

Workloads are compare.py's: ``random`` (64 prompts of 64-256 random tokens, 128 output
tokens each, ``max_num_seqs=128``) and ``c=1`` (the first of them alone, ``max_num_seqs=4``),
on the cached random-weight checkpoint compare.py builds. Each run is
``benchmarks/peers/convoy_runner.py`` (``run_throughput``, warm-up first). Each checkout
builds its CPU kernels in its own ``TORCH_EXTENSIONS_DIR`` (torch caches them by name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository's benchmarks package

from benchmarks.comparison.machine import ensure_model, token_space  # noqa: E402
from benchmarks.comparison.paths import PEERS_DIR  # noqa: E402
from convoy.bench.workloads import BenchRequest, random_workload  # noqa: E402


def run_once(checkout: Path, model: Path, requests: list[BenchRequest], max_num_seqs: int) -> float:
    """Output tokens/s of one timed run, in a fresh process importing ``checkout``'s convoy."""
    spec = {
        "checkout": str(checkout),
        "threads": 2,
        "engine": {
            "model": str(model),
            "device": "cpu",
            "dtype": "float32",
            "max_num_seqs": max_num_seqs,
            "enable_prefix_caching": True,
            "greedy_screening": True,
        },
        "requests": [
            {"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len} for r in requests
        ],
    }
    digest = hashlib.sha1(str(checkout).encode()).hexdigest()[:12]
    extensions = REPO / "bench-results" / "models" / "torch-extensions" / f"ab-{digest}"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.json").write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(checkout), TORCH_EXTENSIONS_DIR=str(extensions))
        subprocess.run(
            [sys.executable, str(PEERS_DIR / "convoy_runner.py"), "in.json", "out.json"],
            env=env,
            cwd=tmp,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        out = json.loads(Path(tmp, "out.json").read_text())
    if out["error"] is not None:
        raise RuntimeError(f"{checkout}: {out['error']}")
    if Path(out["convoy_file"]).resolve().parents[1] != checkout:
        raise RuntimeError(f"convoy came from {out['convoy_file']}, not {checkout}")
    return float(out["num_output_tokens"]) / float(out["elapsed_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the older checkout")
    p.add_argument("--after", type=Path, default=REPO, help="the newer checkout (default: this)")
    p.add_argument("--model-size", choices=("25m", "200m"), default="25m")
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench-results" / "models")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    model = ensure_model(args.model_size, args.cache_dir)
    vocab, avoid = token_space(model)
    requests = random_workload(64, (64, 256), (128, 128), vocab, seed=0, avoid_ids=avoid)
    cases = {"random": (requests, 128), "c=1": (requests[:1], 4)}
    rates: dict[tuple[str, str], list[float]] = {(c, s): [] for c in cases for s in sides}
    for r in range(args.repeats):
        for case, (reqs, max_num_seqs) in cases.items():
            for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                rate = run_once(sides[side], model, reqs, max_num_seqs)
                rates[case, side].append(rate)
                print(f"[{r + 1}/{args.repeats}] {case:6} {side:6} {rate:8.1f} tok/s", flush=True)
    print(f"\n| {args.model_size} | before | after | after/before | runs before / after |")
    print("|---|---|---|---|---|")
    for case in cases:
        b, a = (statistics.median(rates[case, s]) for s in sides)
        runs = " / ".join(", ".join(f"{x:.1f}" for x in rates[case, s]) for s in sides)
        print(f"| {case} | {b:.1f} | {a:.1f} | {a / b:.3f} | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
