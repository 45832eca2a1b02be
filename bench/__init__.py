"""Benchmarks, run on demand (never part of the test suite); each writes its results under bench/results/."""
