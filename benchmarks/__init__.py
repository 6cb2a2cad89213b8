"""Benchmarks: run from the repository root (see the README)."""
