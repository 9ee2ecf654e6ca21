"""The one place that imports MinkowskiEngine.

MinkowskiEngine 0.5.4 still uses the ``collections.Sequence`` style aliases that Python 3.10
removed; we restore them before importing it. Every other module does
``from trainer.minkowski import ME``.
"""

import collections
import collections.abc
import warnings

for _name in ("Sequence", "Iterable", "Mapping", "MutableMapping"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

with warnings.catch_warnings():
    # A CPU-only build warns on every import that it was compiled without CUDA: expected here.
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    import MinkowskiEngine as ME  # noqa: E402

__all__ = ["ME"]
