"""Benchmarks with JSON output."""
