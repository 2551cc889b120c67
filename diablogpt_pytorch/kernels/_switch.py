"""The one switch between the fused kernels and their plain reference implementations."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_reference = False


def reference_enabled() -> bool:
    """Whether :func:`use_reference` is in force (the model then runs only plain PyTorch ops)."""
    return _reference


@contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Within this block every kernel of :mod:`diablogpt_pytorch.kernels` runs its reference
    implementation (composite PyTorch ops, differentiated by autograd) instead of its fused
    autograd function; ``enabled=False`` restores the fused ones inside an outer block. The
    setting is process-wide (not per thread) and is restored on exit."""
    global _reference
    previous, _reference = _reference, bool(enabled)
    try:
        yield
    finally:
        _reference = previous
