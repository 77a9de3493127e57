"""Benchmark harness: ``python -m bench`` (``make bench``) runs the CPU benchmarks.

``bench.sim`` is the cluster simulator, ``bench.decision_cost`` the scheduler decision cost and
``bench.report`` writes their sections of docs/benchmarks.md; other modules here hold the GPU and
operator-scale benchmarks, each with its own entry point.
"""
