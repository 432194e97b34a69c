"""Kernel microbenchmarks, shipped with the package so `amp-engine bench` runs
without a repo checkout; `benchmarks/*.py` are thin wrappers around these."""
