"""Which code a process would run extraction with, seen from inside it: where it imports this
project's packages from and a digest of their source files.

Standard library only: `pipeline.extract` sends `code_identity` by value to the scheduler and
workers of an existing cluster (``--scheduler``), which may not be able to import this project
at all (a ``dask worker`` does not have its working directory on its import path).
"""

from __future__ import annotations

from typing import Any

PACKAGES = ("pipeline", "cache")
"""The project's packages the workers run (and the scheduler unpickles) during extraction."""

DISTRIBUTIONS = (
    "torch", "torchvision", "transformers", "numpy", "scipy", "pillow", "zarr", "numcodecs",
)  # fmt: skip
"""Installed packages whose version can change the bytes a worker writes (the teacher's
numerics, image decoding, pairing, the stored format)."""


def code_identity() -> dict[str, Any]:
    """This process's view of the project: ``host``, ``packages`` (each of `PACKAGES` -> the
    folder it is imported from, None when it cannot be found), ``sha256`` over the
    packages' ``.py`` files (relative path and bytes; None when a package is missing) and
    ``versions`` (each of `DISTRIBUTIONS` -> its installed version, None when absent; read from
    the package metadata, nothing imported)."""
    import hashlib
    import importlib.util
    import socket
    from importlib import metadata
    from pathlib import Path

    digest = hashlib.sha256()
    folders: dict[str, str | None] = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            folders[name] = None
            continue
        root = Path(locations[0])
        folders[name] = str(root)
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "host": socket.gethostname(),
        "packages": folders,
        "sha256": digest.hexdigest() if all(folders.values()) else None,
        "versions": versions,
    }
