"""Running the jobs: repeat 1 of every job, then repeat 2, ..., so that a slow drift of the
shared machine hits every engine alike."""

from __future__ import annotations

import traceback
from collections.abc import Callable

from benchmarks.comparison.jobs import Job
from benchmarks.comparison.results import Run, check_lengths, fraction_of_bound


def run_jobs(
    jobs: list[Job],
    repeats: int,
    peaks_now: Callable[[], dict[str, float]] | None = None,
) -> None:
    """Run every runnable job ``repeats`` times, interleaved; a failure marks the cell.

    With ``peaks_now``, the machine's peaks are measured again just before every run and the
    run's roofline bound is taken at them: a shared or throttled machine can run slower for
    minutes at a time, and a bound measured once at the start would credit or blame the
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
