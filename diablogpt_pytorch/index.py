"""Old import path of :mod:`diablogpt_pytorch.database.index` (the same module object)."""
import sys

from diablogpt_pytorch.database import index as _m

sys.modules[__name__] = _m
