"""The target cache: the only contract between extraction (pipeline/) and training (trainer/).

Format: docs/cache-format.md. Names and versions: cache/schema.py. Writer and checks: cache/store.py; reader: cache/reader.py.
"""

from cache.lock import LockHeldError, cache_lock
from cache.reader import CacheReader, open_cache
from cache.schema import (
    SCHEMA_VERSION,
    CacheError,
    CacheKey,
    CacheKeyMismatch,
    IncompleteCacheError,
    ScanTargets,
    SchemaVersionError,
    UnitData,
    dataset_files,
    dataset_fingerprint,
)
from cache.store import (
    DEFAULT_LAYOUT,
    CacheWriter,
    StorageLayout,
    cache_info,
    list_caches,
    resolve_cache,
    verify_cache,
)

__all__ = [
    "DEFAULT_LAYOUT",
    "SCHEMA_VERSION",
    "CacheError",
    "CacheKey",
    "CacheKeyMismatch",
    "CacheReader",
    "CacheWriter",
    "IncompleteCacheError",
    "LockHeldError",
    "ScanTargets",
    "SchemaVersionError",
    "StorageLayout",
    "UnitData",
    "cache_info",
    "cache_lock",
    "dataset_files",
    "dataset_fingerprint",
    "list_caches",
    "open_cache",
    "resolve_cache",
    "verify_cache",
]
