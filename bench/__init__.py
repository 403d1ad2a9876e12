"""Benchmarks (not tests): each module runs with one command and writes its figures to BENCHMARKS.md."""
