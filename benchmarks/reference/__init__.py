"""Benchmarks against a reference: RETRO-pytorch, another git revision, a GPU step."""
