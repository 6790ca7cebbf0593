"""Benchmarks: workloads, metrics, roofline bounds, and the ``convoy bench`` runners.

``workloads``, ``metrics`` and ``roofline`` are plain Python (plus torch for the two
hardware measurements) and import nothing from the engine, so a peer comparison can run the
very same workloads through another engine and score them with the very same arithmetic.
"""
