"""Old import path of :mod:`diablogpt_pytorch.database.update` (the same module object)."""
import sys

from diablogpt_pytorch.database import update as _m

sys.modules[__name__] = _m
