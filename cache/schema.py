"""The on-disk contract between extraction and training: version, arrays, key, records.

Everything that defines what a cache *is* lives here, in one small module; `cache/store.py`
only implements it. The format itself is described in `docs/cache-format.md`: bump
``SCHEMA_VERSION`` (and update that document) whenever a reader of the old version could not read
a cache written by the new code, or would read it wrongly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION: int = 1
"""Version of the on-disk format. Readers refuse caches with a newer (or an unknown older) one."""

# ---------------------------------------------------------------- file names ----
MANIFEST = "manifest.json"  # ROOT/<digest>/manifest.json: key, units, feature dim, meta
COMPLETE = "COMPLETE"  # ROOT/<digest>/COMPLETE: written by finalize() once every unit is done
UNITS_DIR = "units"  # ROOT/<digest>/units/u00000/ (Zarr group) + u00000.done (marker)
LOCK_FILE = "writer.lock"  # ROOT/<digest>/writer.lock: held by the one extraction run writing
DIGEST_CHARS = 16  # hex chars of the key digest used as the cache directory name


def unit_name(unit_id: int) -> str:
    """Directory name of a unit's Zarr group: ``u00042``."""
    return f"u{unit_id:05d}"


# ---------------------------------------------------------------- arrays ----
# Per point, concatenated over the scans of a unit (rows of scan j: offsets[j]:offsets[j+1]).
# name -> (dtype, trailing shape); "D" stands for the feature dimension of the cache.
POINT_ARRAYS: dict[str, tuple[np.dtype, tuple[int | str, ...]]] = {
    "points": (np.dtype(np.float32), (4,)),  # x, y, z, intensity in the lidar frame
    "target": (np.dtype(np.float16), ("D",)),  # teacher feature; stored for paired rows only
    "camera": (np.dtype(np.int8), ()),  # index into Scan.cameras, -1 = unpaired
    "uv": (np.dtype(np.float32), (2,)),  # pixel coords in the original image (x right, y down)
    "label": (np.dtype(np.uint8), ()),  # semantic class 0..15, 255 = ignore / unlabelled
}
OFFSETS = "offsets"  # (S + 1,) int64 per unit: offsets[0] == 0, offsets[-1] == rows
# `target` is stored only for paired points (camera != -1), in point order: unpaired rows carry
# no target and would be ~half the cache. Scan j owns stored target rows
# target_offsets[j]:target_offsets[j+1]; readers scatter them back to (N, D) with zero rows.
PAIRED_ONLY = ("target",)
TARGET_OFFSETS = "target_offsets"  # (S + 1,) int64 per unit: target_offsets[-1] == paired rows
OFFSETS_DTYPE = np.dtype(np.int64)
UNPAIRED = -1  # camera value of a point seen by no camera
IGNORE_LABEL = 255  # label value of an unlabelled / ignored point


def point_shape(name: str, rows: int, feature_dim: int) -> tuple[int, ...]:
    """Full shape of per-point array ``name`` with ``rows`` rows."""
    trailing = POINT_ARRAYS[name][1]
    return (rows, *(feature_dim if d == "D" else d for d in trailing))


# ---------------------------------------------------------------- errors ----
class CacheError(Exception):
    """A cache cannot be used as asked; the message names the path and the problem."""


class IncompleteCacheError(CacheError):
    """The cache has no COMPLETE marker: some units are missing."""


class SchemaVersionError(CacheError):
    """The cache was written with a schema version this code cannot read."""


class CacheKeyMismatch(CacheError):
    """The cache found was extracted with other settings than asked for."""


# ---------------------------------------------------------------- key ----
@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the targets; its digest names the cache directory."""

    dataset_fingerprint: str
    """`dataset_fingerprint(reader.metadata_files())`: which dataset (and which version of it)."""
    split: str
    """Dataset split extracted ("train", "val", "mini_train", ...)."""
    teacher: str
    """Teacher model as given by the user: a Hugging Face id or a local path."""
    teacher_weights_sha256: str
    """sha256 of the teacher weights file(s): the same name with other weights is another key."""
    image_size: tuple[int, int]
    """(H, W) of the images fed to the teacher."""
    feature_layer: str
    """Which teacher layer the patch tokens come from ("last")."""
    pairing: str
    """Canonical JSON of the PairingConfig fields (min depth, occlusion settings, ...)."""
    teacher_dtype: str = "float32"
    """Dtype the teacher ran in (float32, or float16/bfloat16 autocast): it changes the targets."""
    schema_version: int = SCHEMA_VERSION
    """On-disk format version; part of the key so a new format never reuses an old cache."""

    def __post_init__(self) -> None:
        for f in (
            "dataset_fingerprint",
            "split",
            "teacher",
            "feature_layer",
            "pairing",
            "teacher_dtype",
        ):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ValueError(
                    f"CacheKey.{f} must be a non-empty string, got {getattr(self, f)!r}"
                )
        if not isinstance(self.teacher_weights_sha256, str):
            raise ValueError("CacheKey.teacher_weights_sha256 must be a string")
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"CacheKey.image_size must be two positive ints (H, W), got {size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (image_size as a list)."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheKey:
        """Inverse of `to_dict`; unknown or missing fields raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown CacheKey fields {unknown}")
        try:
            return cls(**{**d, "image_size": tuple(d["image_size"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"incomplete CacheKey {d!r}: {e}") from e

    def canonical_json(self) -> str:
        """Sorted, whitespace-free JSON: the bytes the digest is computed over."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """16 hex chars of sha256 over `canonical_json()`: the cache directory name."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:DIGEST_CHARS]

    def mismatches(self, other: CacheKey) -> list[str]:
        """Names of the fields whose values differ between ``self`` and ``other``."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def dataset_fingerprint(files: list[Path]) -> str:
    """sha256 (hex) over the metadata files: their paths relative to their common folder, sizes
    and contents. Moving the dataset keeps the fingerprint; editing any file changes it."""
    paths = sorted(Path(f).resolve() for f in files)
    if not paths:
        raise ValueError("dataset_fingerprint: no metadata files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"dataset metadata file not found: {p}")
    common = paths[0].parent if len(paths) == 1 else Path(os.path.commonpath(paths))
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(common).as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


# ---------------------------------------------------------------- records ----
@dataclass
class UnitData:
    """One work unit (a block of scans), handed to `CacheWriter.write_unit` as a whole."""

    tokens: list[str]  # sample tokens, in the order of the unit in the manifest
    lidar_paths: list[str]  # absolute .pcd.bin path of each scan
    points: list[np.ndarray]  # each (N_i, 4) float32 x, y, z, intensity (lidar frame)
    target: list[np.ndarray]  # each (N_i, D) float16
    camera: list[np.ndarray]  # each (N_i,) int8, -1 = unpaired
    uv: list[np.ndarray]  # each (N_i, 2) float32 pixel coords in the original image
    label: list[np.ndarray]  # each (N_i,) uint8, 255 = ignore/unlabelled

    def validate(self, feature_dim: int) -> None:
        """Raise ValueError naming the scan and array whose length, shape or dtype is wrong."""
        n = len(self.tokens)
        for name in ("lidar_paths", *POINT_ARRAYS):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UnitData: {len(getattr(self, name))} entries in {name!r} for {n} tokens"
                )
        for j, token in enumerate(self.tokens):
            rows = None
            for name, (dtype, _) in POINT_ARRAYS.items():
                a = getattr(self, name)[j]
                if not isinstance(a, np.ndarray) or a.dtype != dtype:
                    got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                    raise ValueError(f"UnitData scan {token}: {name!r} must be {dtype}, got {got}")
                rows = a.shape[0] if rows is None else rows
                want = point_shape(name, rows, feature_dim)
                if a.shape != want:
                    raise ValueError(
                        f"UnitData scan {token}: {name!r} has shape {a.shape}, expected {want}"
                    )

    def rows(self) -> list[int]:
        """Number of points of each scan."""
        return [len(p) for p in self.points]


@dataclass(frozen=True)
class ScanTargets:
    """Everything the cache holds for one scan (returned by `CacheReader.read_scan`)."""

    token: str  # sample token
    lidar_path: str  # absolute .pcd.bin path at extraction time
    points: np.ndarray  # (N, 4) float32 x, y, z, intensity (lidar frame)
    target: np.ndarray  # (N, D) float16; rows where camera == -1 are zeros
    camera: np.ndarray  # (N,) int8, -1 = unpaired
    uv: np.ndarray  # (N, 2) float32 pixel coords in the original image
    label: np.ndarray  # (N,) uint8, 255 = ignore/unlabelled
