"""Latency and parity benchmarks (not part of the installed package; run from the repository root)."""
