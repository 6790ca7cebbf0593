"""Run a token-id workload on convoy from another source checkout and write the timing as JSON.

Started by ``benchmarks/compare.py --baseline-checkout DIR`` with this run's own interpreter
(so the same torch) and ``PYTHONPATH=DIR``, so that ``import convoy`` finds the checkout's
package first::

    PYTHONPATH=DIR .venv/bin/python benchmarks/peers/convoy_runner.py IN.json OUT.json
    PYTHONPATH=DIR .venv/bin/python benchmarks/peers/convoy_runner.py --serve

``IN.json``: ``{"checkout": DIR, "threads": N, "engine": {"model": DIR, "device": "cpu",
"dtype": "float32", "max_num_seqs": N, "enable_prefix_caching": true,
"greedy_screening": true}, "requests": [{"prompt_token_ids": [...], "output_len": N},
...]}``. ``OUT.json``: ``{"elapsed_s", "num_output_tokens", "output_lens", "max_num_seqs",
"max_num_batched_tokens", "ignored", "convoy_file", "error"}`` (the protocol of
``runner_io.py``, as the other runners).

``--serve`` keeps one engine for many runs, as the harness keeps its in-process convoy: the
first line on stdin is the spec without ``requests``, answered by one JSON line (the engine's
limits, ``"error": null``); every later line ``{"requests": [...]}`` is one timed run,
answered by one line (``elapsed_s``, ``output_lens``); end of input ends the process.
Anything else the process prints goes to stderr, so that stdout carries only the answers.

The run is :func:`convoy.bench.throughput.run_throughput` (warm-up on the first run only, an
empty prefix cache before each), the function that times the harness's own convoy rows. Only
``convoy.LLM`` and that function are relied on, as every checkout since commit 1121a4d has
them; the scheduler's limits are read where that checkout keeps them, else reported as
``null``, and an engine option the checkout does not know (``greedy_screening``) is left out
and named in ``ignored``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from runner_io import run_main

# Engine options that an older checkout may not know: dropped (and reported) if it refuses.
OPTIONAL = ("greedy_screening",)


@dataclass(frozen=True)
class Request:
    """What ``run_throughput`` reads of a request (``convoy.bench.workloads.BenchRequest``'s
    fields, without depending on that module)."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def import_convoy(checkout: str | None) -> Any:
    """``convoy``, checked to come from ``checkout`` (an installed convoy would shadow it if
    PYTHONPATH were not set)."""
    import convoy

    where = Path(convoy.__file__).resolve()
    if checkout and Path(checkout).resolve() not in where.parents:
        raise RuntimeError(f"convoy was imported from {where.parent}, not from {checkout}")
    return convoy


def scheduler_limits(llm: Any) -> tuple[int | None, int | None]:
    """(max_num_seqs, max_num_batched_tokens) of the engine, ``None`` where not found."""
    try:
        sched = llm.engine.config.scheduler
        return int(sched.max_num_seqs), int(sched.max_num_batched_tokens)
    except (AttributeError, TypeError, ValueError):
        return None, None


class Session:
    """One engine, built from a spec, timed on workload after workload."""

    def __init__(self, spec: dict[str, Any]) -> None:
        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        convoy = import_convoy(spec.get("checkout"))
        kwargs = dict(spec["engine"])
        self.ignored: list[str] = []
        try:
            self.llm = convoy.LLM(**kwargs)
        except (TypeError, ValueError):
            self.ignored = [k for k in OPTIONAL if k in kwargs]
            if not self.ignored:
                raise
            self.llm = convoy.LLM(**{k: v for k, v in kwargs.items() if k not in self.ignored})
        seqs, tokens = scheduler_limits(self.llm)
        self.info = {
            "max_num_seqs": seqs,
            "max_num_batched_tokens": tokens,
            "ignored": self.ignored,
            "convoy_file": convoy.__file__,
        }
        self._warm = False

    def run(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        from convoy.bench.throughput import run_throughput

        # Duck-typed for run_throughput, which reads only these fields of a BenchRequest.
        reqs: Any = [Request(list(r["prompt_token_ids"]), int(r["output_len"])) for r in requests]
        result, timings = run_throughput(self.llm, reqs, use_tqdm=False, warmup=not self._warm)
        self._warm = True
        lens = [int(t.num_output_tokens) for t in timings]
        return {
            "elapsed_s": float(result.elapsed_s),
            "num_output_tokens": sum(lens),
            "output_lens": lens,
            "error": None,
        }


def run_once(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the engine and time ``spec["requests"]`` once."""
    session = Session(spec)
    return {**session.info, **session.run(spec["requests"])}


def serve(lines: IO[str], answers: IO[str]) -> int:
    """The ``--serve`` loop: the first line builds the engine, each later one is a run."""
    session: Session | None = None
    for line in lines:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            if session is None:
                session = Session(msg)
                answer = {"ready": True, **session.info, "error": None}
            else:
                answer = session.run(msg["requests"])
        except Exception as e:
            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        answers = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # convoy's prints, and any C library's, go to stderr from here on
        return serve(sys.stdin, answers)
    return run_main("convoy_runner.py", run_once, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
