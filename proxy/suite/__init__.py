"""Benchmark suite: emulated networks and the runs that measure Tightwad across them."""
