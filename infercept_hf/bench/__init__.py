"""Benchmark workloads, trace files, metrics, figures and reports (docs/WORKLOADS.md)."""
