"""Benchmarks that compare convoy with its peers (run as scripts; see compare.py)."""
