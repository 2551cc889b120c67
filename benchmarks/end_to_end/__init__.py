"""End-to-end benchmarks: database build, generation, retrieval gain, retro-fitting."""
