"""Micro benchmarks: single ops and kernels, timed in one process, alternating."""
