"""Old import path of :mod:`diablogpt_pytorch.database._bert` (the same module object)."""
import sys

from diablogpt_pytorch.database import _bert as _m

sys.modules[__name__] = _m
