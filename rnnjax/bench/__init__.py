"""Benchmarks: ``python -m rnnjax.bench`` (cells against peer libraries) and ``python -m rnnjax.bench.parallel_scan``.

Speed goals are checked here, by scripts that print ratios measured in one run, never by timed tests.
"""
