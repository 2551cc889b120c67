"""Old import path of :mod:`diablogpt_pytorch.database.embedder` (the same module object)."""
import sys

from diablogpt_pytorch.database import embedder as _m

sys.modules[__name__] = _m
