"""The pieces of ``benchmarks/compare.py``.

* :mod:`.paths`: where the peers' installs live (environment variables, else paths under the
  repository).
* :mod:`.results`: one run, one table cell, and the arithmetic on them.
* :mod:`.machine`: the device the engines run on, its measured peaks, the cached checkpoints.
* :mod:`.workloads`: the workloads of a run, from the command line.
* :mod:`.engines`: one adapter per engine (how to load it, check it is installed, time one run).
* :mod:`.jobs`: the job table, which engine configuration runs on which workload.
* :mod:`.interleave`: running the jobs, repeat by repeat.
* :mod:`.report`: the markdown report, its JSON and its plot.
"""
