"""Helpers shared by the benchmarks: report writing (``report``), timing (``timing``) and the
per-measurement worker process (``worker``), and the folders they all use."""

from pathlib import Path

BENCH_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_ROOT.parent
RESULTS = BENCH_ROOT / "results"  # every committed result
