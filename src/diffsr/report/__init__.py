"""Benchmarks of several methods on one dataset: tables, the papers' reference numbers, an HTML report."""
