"""The one place that imports MinkowskiEngine.

MinkowskiEngine 0.5.4 still uses the ``collections.Sequence`` style aliases that Python 3.10
removed; we restore them before importing it. Every other module does
``from trainer.minkowski import ME``.
"""

import collections
import collections.abc

for _name in ("Sequence", "Iterable", "Mapping", "MutableMapping"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

import MinkowskiEngine as ME  # noqa: E402

__all__ = ["ME"]
