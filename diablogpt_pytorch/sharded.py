"""Old import path of :mod:`diablogpt_pytorch.database.sharded` (the same module object);
``python -m diablogpt_pytorch.sharded`` runs its command line."""
import sys

from diablogpt_pytorch.database import sharded as _m

if __name__ == "__main__":
    _m.main()
else:
    sys.modules[__name__] = _m
