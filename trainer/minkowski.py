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

# ME 0.5.4 builds its sparse matrices with the deprecated torch.sparse.SparseTensor constructor;
# torch warns about it on every call. It is ME's internal business, not the user's.
warnings.filterwarnings(
    "ignore", message=r".*torch\.sparse\.SparseTensor.*deprecated", category=UserWarning
)

__all__ = ["ME"]
