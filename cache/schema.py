"""The on-disk contract between extraction and training: version, arrays, key, records.

Everything that defines what a cache *is* lives here, in one small module; `cache/store.py`
(writer) and `cache/reader.py` only implement it. The format itself is described in `docs/cache-format.md`: bump
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

SCHEMA_VERSION: int = 3
"""Newest version of the on-disk format: readers refuse caches with a newer (or an unknown older)
one. History:

1. per-point float16 targets of the paired points (`target`, `target_offsets`); no
   ``target_format`` in the key.
2. a choice of target format (`TARGET_FORMATS`, key field ``target_format``): ``point-i8`` and
   ``grid-f16`` are new arrays a version-1 reader would not find (grid) or would misread (int8
   as numbers), so their caches carry version 2 and version-1 code refuses them ("update this
   code"). ``point-f16`` is unchanged and still written as version 1 (same bytes, same key and
   digest): caches written before version 2 existed and caches written now are the same thing,
   readable by both.
3. target format ``grid-i8`` (the grids as int8 + a float16 scale per patch cell, new array
   ``grid_scale``): version-2 code knows no such format, so its caches carry version 3 and
   version-2 code refuses them ("update this code"). The other formats keep their versions.
"""
READABLE_VERSIONS: tuple[int, ...] = (1, 2, 3)
"""Versions this code reads (a cache records the version its target format needs)."""

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
# Per point, concatenated over the scans of a unit (rows of scan j: offsets[j]:offsets[j+1]),
# stored by every target format. name -> (dtype, trailing shape).
POINT_ARRAYS: dict[str, tuple[np.dtype, tuple[int | str, ...]]] = {
    "points": (np.dtype(np.float32), (4,)),  # x, y, z, intensity in the lidar frame
    "camera": (np.dtype(np.int8), ()),  # index into Scan.cameras, -1 = unpaired
    "uv": (np.dtype(np.float32), (2,)),  # pixel coords in the original image (x right, y down)
    "label": (np.dtype(np.uint8), ()),  # semantic class 0..15, 255 = ignore / unlabelled
}
OFFSETS = "offsets"  # (S + 1,) int64 per unit: offsets[0] == 0, offsets[-1] == rows
TARGET_OFFSETS = "target_offsets"  # (S + 1,) int64 per unit: target_offsets[-1] == paired rows
VIEW_OFFSETS = "view_offsets"  # (S + 1,) int64 (grid formats): scan j owns views [v[j], v[j + 1])
GRID_OFFSETS = "grid_offsets"  # (S + 1,) int64 (grids): scan j owns grid rows [g[j], g[j + 1])
VIEW_SIZES = "view_sizes"  # (V, 4) int32 (grid formats): h, w, H0, W0 of each camera image (view)
OFFSETS_DTYPE = np.dtype(np.int64)
VIEW_SIZES_DTYPE = np.dtype(np.int32)
UNPAIRED = -1  # camera value of a point seen by no camera
IGNORE_LABEL = 255  # label value of an unlabelled / ignored point


@dataclass(frozen=True)
class TargetFormat:
    """How a cache stores the teacher targets (docs/cache-format.md, "Target formats")."""

    name: str
    schema_version: int
    """Version a cache of this format is written with: the first version whose reader reads it."""
    row_arrays: dict[str, tuple[np.dtype, tuple[int | str, ...]]]
    """Sharded target arrays, read a row range per scan: name -> (dtype, trailing shape)."""
    index_arrays: tuple[str, ...]
    """Small per-unit arrays (one plain chunk each), read whole when a unit is opened."""
    paired_rows: bool
    """True: one row of each row array per paired point, in point order (``target_offsets``);
    False: the teacher's patch grids of every camera image (``grid_offsets``, ``view_*``)."""


DEFAULT_TARGET_FORMAT = "point-f16"
TARGET_FORMATS: dict[str, TargetFormat] = {
    # teacher feature of each paired point, float16 (the version-1 layout, byte for byte)
    "point-f16": TargetFormat(
        "point-f16", 1, {"target": (np.dtype(np.float16), ("D",))},
        (OFFSETS, TARGET_OFFSETS), paired_rows=True,
    ),
    # the same rows as int8 with one float16 scale per row: x ~ target * target_scale
    "point-i8": TargetFormat(
        "point-i8", 2,
        {"target": (np.dtype(np.int8), ("D",)), "target_scale": (np.dtype(np.float16), ())},
        (OFFSETS, TARGET_OFFSETS), paired_rows=True,
    ),
    # the patch grid (h x w rows of D) of every camera image, sampled at uv by the reader
    "grid-f16": TargetFormat(
        "grid-f16", 2, {"grid": (np.dtype(np.float16), ("D",))},
        (OFFSETS, VIEW_OFFSETS, GRID_OFFSETS, VIEW_SIZES), paired_rows=False,
    ),
    # the same grids as int8 with one float16 scale per cell: grid ~ grid * grid_scale
    "grid-i8": TargetFormat(
        "grid-i8", 3,
        {"grid": (np.dtype(np.int8), ("D",)), "grid_scale": (np.dtype(np.float16), ())},
        (OFFSETS, VIEW_OFFSETS, GRID_OFFSETS, VIEW_SIZES), paired_rows=False,
    ),
}  # fmt: skip
"""The target formats (`extract-teacher --target-format`); the reader returns the same
`ScanTargets` for each."""
QUANTIZED_FORMATS: dict[str, str] = {"point-i8": "target", "grid-i8": "grid"}
"""Formats stored as int8 rows with one float16 scale per row (`quantize_rows`): the int8
array's name; its scales are ``<name>_scale``."""


def target_format(name: str) -> TargetFormat:
    """The `TargetFormat` called ``name``; ValueError listing the known ones otherwise."""
    if name not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {name!r}; choose one of {sorted(TARGET_FORMATS)}")
    return TARGET_FORMATS[name]


def quantize_rows(x: Any) -> tuple[Any, Any]:
    """(P, D) float16 → (int8 (P, D), float16 scale (P,)): symmetric per row, scale = max|x| / 127
    rounded to float16 (down where 127 * scale would pass the float16 maximum), q =
    round-half-even(x / scale) clipped to ±127; an all-zero row (or one whose scale underflows
    float16) gets scale 0 and q 0. `dequantize_rows` inverts it to within
    half a step (scale / 2) plus float16 rounding.

    ``x`` is a numpy array (numpy arrays come back) or a torch tensor on any device (tensors on
    that device come back: extraction quantizes on the GPU). One implementation, in torch:
    every step is exactly rounded IEEE float32 (max, division, round-half-even, casts), so
    every device gives the same bytes (tests compare with numpy's formula)."""
    import torch

    x32 = torch.as_tensor(x).to(torch.float32, copy=True)  # (P, D), ours to change in place
    if x32.shape[1]:
        low, high = torch.aminmax(x32, dim=1)
        amax = torch.maximum(-low, high)  # (P,)
    else:
        amax = x32.new_zeros(len(x32))
    scale = (amax / 127.0).half()  # (P,)
    # near the float16 maximum a scale rounded up would dequantize 127 * scale to inf: step it
    # one float16 ulp towards 0 (scales are >= 0, so one less in the bit pattern)
    too_big = scale.float() * 127 > torch.finfo(torch.float16).max
    if bool(too_big.any()):
        bits = scale.view(torch.int16)
        bits[too_big] -= 1
    s32 = scale.float()[:, None]  # (P, 1)
    q = x32.div_(s32).round_()  # (P, D), in place: inf/nan where the scale is 0
    q = q.masked_fill_(s32 == 0, 0.0).clamp_(-127, 127).to(torch.int8)
    if isinstance(x, np.ndarray):
        return q.numpy(), scale.numpy()
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(P, D) int8 and (P,) float16 scales → (P, D) float16 = fp16(q * scale): q and scale are
    exact in float16, their product is exact in float32 and rounded once to nearest-even (the
    values of numpy's ``(q.astype(f32) * scale.astype(f32)).astype(f16)``)."""
    import torch  # in-place float16 product: ~5x faster than numpy's casts (a loader hot path)

    out = torch.from_numpy(q).half()  # (P, D), int8 → float16 exactly
    out.mul_(torch.from_numpy(scale)[:, None])
    return out.numpy()


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
    """Teacher model: a Hugging Face id as given, or a local folder's own name (its path does not
    matter: the hashes identify it)."""
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
    teacher_config_sha256: str = ""
    """sha256 of the teacher's config.json (canonical JSON, less our demo markers): the same
    weights with another activation, layer-norm eps, ... give other targets. Empty in keys made
    before it existed (left out of `to_dict` then, so their digests hold; a new extraction never
    matches them)."""
    image_decode: str = "cpu"
    """Where the JPEGs were decoded and resized: "cpu" (PIL) or "device" (nvJPEG and a float
    resize: within one grey level, so other targets). Left out of `to_dict` when "cpu"."""
    target_format: str = DEFAULT_TARGET_FORMAT
    """How the targets are stored (`TARGET_FORMATS`); each format is its own cache. Left out of
    `to_dict` (so of the digest) when it is point-f16: version-1 keys, which lack the field, keep
    their digest and read as point-f16."""
    teacher_weights_dtype: str = "float32"
    """Dtype the teacher's weights are stored in (`TeacherIdentity.weights_dtype`); they run in
    float32 (plus ``teacher_dtype`` autocast). Before 2026-11-26 a float16/bfloat16 checkpoint
    ran in its own dtype under a key saying float32: such a teacher now gets another key, not
    that cache. Left out of `to_dict` when float32 (every released DINOv2), digests unchanged."""
    schema_version: int | None = None
    """On-disk format version; part of the key so a new format never reuses an old cache.
    None: the version ``target_format`` is written with (`TargetFormat.schema_version`: 1 for
    point-f16, 2 for point-i8 and grid-f16, 3 for grid-i8); a version
    older than the format needs is refused."""

    def __post_init__(self) -> None:
        for f in (
            "dataset_fingerprint",
            "split",
            "teacher",
            "feature_layer",
            "pairing",
            "teacher_dtype",
            "teacher_weights_dtype",
        ):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ValueError(
                    f"CacheKey.{f} must be a non-empty string, got {getattr(self, f)!r}"
                )
        for f in ("teacher_weights_sha256", "teacher_config_sha256"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"CacheKey.{f} must be a string")
        if self.image_decode not in ("cpu", "device"):
            raise ValueError(
                f"CacheKey.image_decode must be 'cpu' or 'device', got {self.image_decode!r}"
            )
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"CacheKey.image_size must be two positive ints (H, W), got {size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        needed = target_format(self.target_format).schema_version
        version = needed if self.schema_version is None else self.schema_version
        if not isinstance(version, int) or version < needed:
            raise ValueError(
                f"CacheKey.schema_version {version!r} cannot hold target format "
                f"{self.target_format!r} (needs version {needed} or later)"
            )
        object.__setattr__(self, "schema_version", version)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (image_size as a list; the fields added later left out at their
        old meaning: target_format point-f16, no teacher_config_sha256, image_decode cpu,
        teacher_weights_dtype float32)."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        if d["target_format"] == DEFAULT_TARGET_FORMAT:
            del d["target_format"]  # the version-1 key, digest unchanged
        if not d["teacher_config_sha256"]:
            del d["teacher_config_sha256"]  # keys made before the field: digest unchanged
        if d["image_decode"] == "cpu":
            del d["image_decode"]
        if d["teacher_weights_dtype"] == "float32":
            del d["teacher_weights_dtype"]
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


def _metadata_paths(files: list[Path]) -> tuple[list[Path], Path]:
    paths = sorted(Path(f).resolve() for f in files)
    if not paths:
        raise ValueError("dataset_fingerprint: no metadata files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"dataset metadata file not found: {p}")
    common = paths[0].parent if len(paths) == 1 else Path(os.path.commonpath(paths))
    return paths, common


def dataset_files(files: list[Path]) -> dict[str, str]:
    """Each metadata file's path relative to their common folder → sha256 (hex) of its bytes;
    recorded in the manifest so a mismatch can name the files that changed."""
    paths, common = _metadata_paths(files)
    digests = {}
    for p in paths:
        with open(p, "rb") as fh:
            digests[p.relative_to(common).as_posix()] = hashlib.file_digest(
                fh, "sha256"
            ).hexdigest()
    return digests


def dataset_fingerprint(files: list[Path]) -> str:
    """sha256 (hex) over the metadata files: their paths relative to their common folder, sizes
    and contents. Moving the dataset keeps the fingerprint; editing any file changes it."""
    paths, common = _metadata_paths(files)
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
    target: list[np.ndarray] | None  # each (N_i, D) float16; point formats only (grid: None)
    camera: list[np.ndarray]  # each (N_i,) int8, -1 = unpaired
    uv: list[np.ndarray]  # each (N_i, 2) float32 pixel coords in the original image
    label: list[np.ndarray]  # each (N_i,) uint8, 255 = ignore/unlabelled
    grids: list[np.ndarray] | None = None
    """Grid formats only: each (C_i, h, w, D) float16, the teacher's patch grid of each camera
    of scan i, camera c = the value of `camera` (index into the scan's cameras). For grid-i8
    they may come quantized already: int8, with ``grid_scales``."""
    image_sizes: list[np.ndarray] | None = None
    """Grid formats only: each (C_i, 2) int (H0, W0), the original size of each camera image."""
    paired_target: list[np.ndarray] | None = None
    """Point formats, instead of ``target``: each (P_i, D) float16, the targets of scan i's
    paired points (camera != -1) only, in point order: the rows the cache stores (extraction
    samples straight into them, without an (N_i, D) array that is a third zeros). For
    point-i8 they may come quantized already: int8, with ``paired_target_scale``."""
    paired_target_scale: list[np.ndarray] | None = None
    """point-i8 with int8 ``paired_target``: each (P_i,) float16, the rows' scales, both as
    `quantize_rows` makes them (extraction quantizes on the teacher's device)."""
    grid_scales: list[np.ndarray] | None = None
    """grid-i8 with int8 ``grids``: each (C_i, h, w) float16, the cells' scales, both as
    `quantize_rows` makes them from the (C_i * h * w, D) cells."""

    def validate(self, feature_dim: int, fmt: str = DEFAULT_TARGET_FORMAT) -> None:
        """Raise ValueError naming the scan and array whose length, shape or dtype is wrong
        (the arrays format ``fmt`` needs)."""
        grid = not target_format(fmt).paired_rows
        paired_only = not grid and self.target is None and self.paired_target is not None
        per_scan = {**POINT_ARRAYS}
        if not grid and not paired_only:
            per_scan["target"] = (np.dtype(np.float16), ("D",))
        needs = (
            ("grids", "image_sizes") if grid else ("paired_target",) if paired_only else ("target",)
        )
        n = len(self.tokens)
        for name in ("lidar_paths", *per_scan, *needs):
            if getattr(self, name) is None:
                raise ValueError(f"UnitData: format {fmt!r} needs {name!r}, got None")
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UnitData: {len(getattr(self, name))} entries in {name!r} for {n} tokens"
                )
        for j, token in enumerate(self.tokens):
            rows = None
            for name, (dtype, trailing) in per_scan.items():
                a = getattr(self, name)[j]
                if not isinstance(a, np.ndarray) or a.dtype != dtype:
                    got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                    raise ValueError(f"UnitData scan {token}: {name!r} must be {dtype}, got {got}")
                rows = a.shape[0] if rows is None else rows
                want = (rows, *(feature_dim if d == "D" else d for d in trailing))
                if a.shape != want:
                    raise ValueError(
                        f"UnitData scan {token}: {name!r} has shape {a.shape}, expected {want}"
                    )
            if grid:
                self._validate_grid(j, token, feature_dim, fmt)
            if paired_only:
                self._validate_paired(j, token, feature_dim, fmt)

    def _validate_paired(self, j: int, token: str, feature_dim: int, fmt: str) -> None:
        t = self.paired_target[j]
        paired = int((self.camera[j] != -1).sum())
        quantized = self.paired_target_scale is not None
        if quantized and fmt != "point-i8":
            raise ValueError(f"UnitData: 'paired_target_scale' is for point-i8, not {fmt!r}")
        dtype = np.int8 if quantized else np.float16
        if not isinstance(t, np.ndarray) or t.dtype != dtype or t.shape != (paired, feature_dim):
            got = (t.dtype, t.shape) if isinstance(t, np.ndarray) else type(t).__name__
            raise ValueError(
                f"UnitData scan {token}: 'paired_target' must be {np.dtype(dtype)} "
                f"{(paired, feature_dim)} (paired points x D), got {got}"
            )
        if quantized:
            self._validate_scales("paired_target_scale", j, token, (paired,))

    def _validate_scales(self, name: str, j: int, token: str, shape: tuple[int, ...]) -> None:
        """Scan ``j``'s entry of ``name`` (a list of quantization scales) is float16 ``shape``."""
        scales = getattr(self, name)
        scale = scales[j] if len(scales) > j else None
        if not isinstance(scale, np.ndarray) or scale.dtype != np.float16 or scale.shape != shape:
            raise ValueError(f"UnitData scan {token}: {name!r} must be float16 {shape}")

    def _validate_grid(self, j: int, token: str, feature_dim: int, fmt: str) -> None:
        g, sizes = self.grids[j], np.asarray(self.image_sizes[j])
        quantized = self.grid_scales is not None
        if quantized and fmt != "grid-i8":
            raise ValueError(f"UnitData: 'grid_scales' is for grid-i8, not {fmt!r}")
        dtype = np.dtype(np.int8 if quantized else np.float16)
        if not isinstance(g, np.ndarray) or g.dtype != dtype or g.ndim != 4:
            raise ValueError(f"UnitData scan {token}: 'grids' must be (C, h, w, D) {dtype}")
        if g.shape[3] != feature_dim or min(g.shape[1:3], default=1) < 1:
            raise ValueError(
                f"UnitData scan {token}: 'grids' has shape {g.shape}, expected (C, h, w, "
                f"{feature_dim}) with h, w >= 1"
            )
        if sizes.shape != (len(g), 2) or np.any(sizes < 1):
            raise ValueError(
                f"UnitData scan {token}: 'image_sizes' must be ({len(g)}, 2) positive (H0, W0), "
                f"got {sizes.tolist()}"
            )
        if quantized:
            self._validate_scales("grid_scales", j, token, g.shape[:3])
        if np.any(self.camera[j] >= len(g)):
            raise ValueError(
                f"UnitData scan {token}: camera index {int(self.camera[j].max())} has no grid "
                f"({len(g)} grids)"
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

    @property
    def paired(self) -> np.ndarray:
        """(N,) bool: the points a camera saw (their `target` rows are the teacher's)."""
        return self.camera != UNPAIRED
