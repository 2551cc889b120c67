"""Benchmarks of diablogpt_pytorch, run from the repository root as modules::

    python -m benchmarks.micro.bench_attention
    python -m benchmarks.reference.compare_reference
    python -m benchmarks.end_to_end.retrieval_gain

- ``micro/``: single ops and kernels (attention, weight gradient, optimizer step, tokenizer).
- ``reference/``: against lucidrains' RETRO-pytorch (``compare_reference``), between two git
  revisions of this package (``ab_step``), and one training step on a GPU (``gpu_step``).
- ``end_to_end/``: whole jobs (database build, generation, retrieval's gain, retro-fitting).
- ``common/``: the shared helpers (report writing, timing, the per-measurement worker process).
- ``results/``: every committed result (JSON, plots, profiler tables); BENCHMARKS.md renders them.

Not installed with the package (``setup.py`` excludes it): run from a checkout.
"""
