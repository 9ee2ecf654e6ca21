"""Writer, checks and lookup of the target cache (format: `docs/cache-format.md`, names:
`cache/schema.py`; the reader is `cache/reader.py`).

Layout of one cache, ``ROOT/<key.digest()>/``::

    manifest.json          key, schema version, units (scan tokens), feature dim, layout, meta
    writer.lock            while an extraction run writes (cache/lock.py)
    units/u00000/          one Zarr v3 group per unit, arrays sharded: one shard file per array
    units/u00000/done/     the unit's record (sub-group attributes), moved in with the data
    units/u00000.done      JSON marker: that record (rows, per-file sizes and crc32c), stamped
    units/.u00000.tmp-*    a unit being written (or left by a killed writer: never read)
    COMPLETE               written by finalize() once every unit is done

A unit (block of scans) is written by one task under a temporary name, with its record, and
renamed into place in one step, then marked done; no two processes ever write the same Zarr
shard, a half-written unit never looks complete, and a unit in place that carries a whole record
is never replaced (a duplicate attempt keeps it and publishes its record).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from tqdm import tqdm
from zarr.codecs import BloscCodec, ZstdCodec

from cache.lock import cache_lock
from cache.schema import (
    COMPLETE,
    DEFAULT_TARGET_FORMAT,
    GRID_OFFSETS,
    MANIFEST,
    OFFSETS,
    OFFSETS_DTYPE,
    POINT_ARRAYS,
    QUANTIZED_FORMATS,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    TARGET_OFFSETS,
    UNITS_DIR,
    UNPAIRED,
    VIEW_OFFSETS,
    VIEW_SIZES,
    VIEW_SIZES_DTYPE,
    CacheError,
    CacheKey,
    CacheKeyMismatch,
    IncompleteCacheError,
    SchemaVersionError,
    UnitData,
    point_shape,
    quantize_rows,
    target_format,
    unit_name,
)
from cache.shardwrite import (
    CHECKSUM,
    file_checksum,
    write_group,
    write_plain_array,
    write_sharded_array,
)

# ---------------------------------------------------------------- layout ----
CODECS = ("none", "zstd", "blosc")


@dataclass(frozen=True)
class StorageLayout:
    """How a unit's arrays are chunked and compressed (recorded in the manifest; readers
    need nothing from it: Zarr metadata describes each array)."""

    chunk_rows: int = 16384
    """Rows per inner chunk: the read granularity inside a shard (a scan is ~10-40k points)."""
    target_codec: str = "none"
    """Compressor of `target`: "none", "zstd" or "blosc" (fp16 features barely compress)."""
    other_codec: str = "none"
    """Compressor of points, camera, uv, label (zstd: ~2 % smaller, slower under CPU load)."""

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"StorageLayout.chunk_rows must be >= 1, got {self.chunk_rows}")
        for c in (self.target_codec, self.other_codec):
            if c not in CODECS:
                raise ValueError(f"unknown codec {c!r}; choose one of {CODECS}")


DEFAULT_LAYOUT = StorageLayout()


def _compressors(codec: str, dtype: np.dtype) -> tuple:
    if codec == "zstd":
        return (ZstdCodec(level=1),)
    if codec == "blosc":
        return (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=dtype.itemsize),)
    return ()


def _offsets(counts: list[int]) -> np.ndarray:
    """(S + 1,) int64 running sum starting at 0."""
    offsets = np.zeros(len(counts) + 1, dtype=OFFSETS_DTYPE)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def target_arrays(
    data: UnitData, feature_dim: int, fmt: str = DEFAULT_TARGET_FORMAT
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """The stored target arrays of ``data`` in format ``fmt``: (row arrays as lists of parts, one
    per scan or one in all, whose row-wise concatenation is the array; index arrays), each name
    -> value (cache/schema.py `TARGET_FORMATS`; `offsets` is not included)."""
    spec = target_format(fmt)
    if spec.paired_rows:
        paired = [c != UNPAIRED for c in data.camera]  # each (N_i,) bool
        index = {TARGET_OFFSETS: _offsets([int(m.sum()) for m in paired])}
        if data.target is None and data.paired_target_scale is not None:  # point-i8, quantized
            q = list(data.paired_target) or [np.zeros((0, feature_dim), np.int8)]  # (P_i, D)
            scale = list(data.paired_target_scale) or [np.zeros(0, np.float16)]  # (P_i,)
            return {"target": q, "target_scale": scale}, index
        if data.paired_target is not None and data.target is None:
            parts = list(data.paired_target)  # already the paired rows
        else:
            parts = [t[m] for t, m in zip(data.target, paired, strict=True)]
        parts = parts or [np.zeros((0, feature_dim), np.float16)]  # (P_i, D) float16
        if fmt == "point-i8":
            q, scale = quantize_rows(np.concatenate(parts))  # (P, D) int8, (P,) float16
            return {"target": [q], "target_scale": [scale]}, index
        return {"target": parts}, index
    grids = [g.reshape(-1, feature_dim) for g in data.grids]  # each (C_i * h * w, D)
    empty = np.zeros((0, feature_dim), np.float16)
    if fmt == "grid-i8":
        if data.grid_scales is not None:  # quantized already (on the teacher's device)
            rows = {
                "grid": grids or [empty.astype(np.int8)],
                "grid_scale": [s.reshape(-1) for s in data.grid_scales]
                or [np.zeros(0, np.float16)],
            }
        else:
            q, scale = quantize_rows(np.concatenate(grids) if grids else empty)
            rows = {"grid": [q], "grid_scale": [scale]}
    else:
        rows = {"grid": grids or [empty]}
    sizes = [
        np.column_stack([np.tile(g.shape[1:3], (len(g), 1)), np.asarray(hw).reshape(-1, 2)])
        for g, hw in zip(data.grids, data.image_sizes, strict=True)
    ]  # each (C_i, 4): h, w, H0, W0
    index = {
        VIEW_OFFSETS: _offsets([len(g) for g in data.grids]),
        GRID_OFFSETS: _offsets([len(g) for g in grids]),
        VIEW_SIZES: (np.concatenate(sizes) if sizes else np.zeros((0, 4))).astype(VIEW_SIZES_DTYPE),
    }
    return rows, index


def write_unit_group(
    path: Path,
    data: UnitData,
    feature_dim: int,
    layout: StorageLayout,
    fmt: str = DEFAULT_TARGET_FORMAT,
    digests: dict[str, dict[str, Any]] | None = None,
) -> dict[str, int]:
    """Write ``data`` as a new Zarr v3 group at ``path``: one shard file per row array, the
    targets in format ``fmt`` (point formats keep only the rows of paired points, camera != -1;
    see cache/schema.py). Returns the rows of each array written. Uncompressed arrays (the
    default) and the group are written by `cache.shardwrite`, byte for byte as zarr-python
    writes them, at a fraction of the CPU time and without concatenating the scans' rows; their
    files' sizes and checksums go into ``digests`` (by path relative to ``path``) when given.
    Compressed arrays are written by zarr-python."""
    data.validate(feature_dim, fmt)
    spec = target_format(fmt)
    attrs = {
        "schema_version": spec.schema_version,
        "tokens": list(data.tokens),
        "lidar_paths": list(data.lidar_paths),
    }
    if fmt != DEFAULT_TARGET_FORMAT:  # absent = point-f16: the version-1 group, byte for byte
        attrs["target_format"] = fmt
    written = write_group(path, attrs)
    store = zarr.storage.LocalStore(path)
    targets, index = target_arrays(data, feature_dim, fmt)
    rows = {}
    for name, (dtype, _) in POINT_ARRAYS.items():
        rows[name] = list(getattr(data, name)) or [
            np.zeros(point_shape(name, 0, feature_dim), dtype)
        ]
    counts = {}
    for name, parts in {**rows, **targets}.items():
        n = counts[name] = sum(len(p) for p in parts)
        # The whole unit in one shard (one file per array), cut into k equal chunks of at most
        # chunk_rows rows: Zarr pads the last chunk to full size, so equal chunks waste < k rows.
        k = max(1, -(-n // layout.chunk_rows))
        c = max(1, -(-n // k))
        codec = layout.target_codec if name in spec.row_arrays else layout.other_codec
        if codec == "none":
            files = write_sharded_array(path / name, parts, chunk_rows=c, n_chunks=k)
            written.update({f"{name}/{rel}": f for rel, f in files.items()})
            continue
        arr = np.concatenate(parts)
        zarr.create_array(
            store,
            name=name,
            data=arr,
            chunks=(c, *arr.shape[1:]),
            shards=(k * c, *arr.shape[1:]),
            fill_value=0,
            compressors=_compressors(codec, arr.dtype),
        )
    index = {OFFSETS: _offsets(data.rows()), **index}
    for name, arr in index.items():  # one plain chunk each, read whole
        files = write_plain_array(path / name, arr)
        written.update({f"{name}/{rel}": f for rel, f in files.items()})
        counts[name] = len(arr)
    if digests is not None:
        digests.update(written)
    return counts


def row_arrays(fmt: str) -> tuple[str, ...]:
    """The sharded row arrays of a unit of format ``fmt`` (per-point, then target arrays)."""
    return (*POINT_ARRAYS, *target_format(fmt).row_arrays)


def unit_arrays(fmt: str) -> tuple[str, ...]:
    """Every array of a unit of format ``fmt``: row arrays, then the small index arrays."""
    return (*row_arrays(fmt), *target_format(fmt).index_arrays)


# ---------------------------------------------------------------- small file helpers ----
def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digests(
    directory: Path, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"size", "crc32c"}} of every file under ``directory``; files in
    ``known`` (checksummed while written) are taken from it, not read again."""
    out = {}
    known = known or {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file():
            continue
        if rel in known:
            out[rel] = known[rel]
            continue
        out[rel] = {"size": p.stat().st_size, CHECKSUM: file_checksum(p)}
    return out


def _array_digest(files: dict[str, dict[str, Any]], name: str) -> str:
    """One digest per array: sha256 over the (path, checksum) of its stored files (metadata +
    shards)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        if rel.split("/", 1)[0] == name:
            h.update(f"{rel}\0{files[rel][CHECKSUM]}\n".encode())
    return h.hexdigest()


UNIT_RECORD = "done"
"""Sub-group of a unit folder whose attributes are the unit's record: its `.done` marker less the
stamp (`STAMP`). Written in the temp dir, it moves into place with the data in one rename, so the
marker published afterwards is a copy of the record of the data in place (docs/cache-format.md)."""
STAMP = ("written_at", "host", "pid")
"""Marker fields that are not part of the record (who published it, when)."""


def _read_record(unit_dir: Path) -> dict | None:
    """The record a unit folder carries (`UNIT_RECORD`); None when it has none (units written by
    earlier code, whose marker alone describes them) or it is unreadable."""
    try:
        record = json.loads((unit_dir / UNIT_RECORD / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def _whole_record(unit_dir: Path) -> dict | None:
    """The record of the unit folder at ``unit_dir`` when every file it lists is there with its
    recorded size (a unit some attempt finished and renamed into place); else None."""
    record = _read_record(unit_dir)
    if record is None:
        return None
    for rel, want in record["files"].items():
        try:
            if (unit_dir / rel).stat().st_size != want["size"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return record


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{what} not found: {path}") from None
    except OSError as e:  # a folder where the file belongs, no permission, an I/O error
        raise CacheError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise CacheError(f"{what} {path} is not valid JSON: {e}") from None


def _environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "host": socket.gethostname(),
    }


# ---------------------------------------------------------------- writer ----
@dataclass
class CacheWriter:
    """Writes one cache unit by unit. Picklable: Dask tasks receive it and call `write_unit`."""

    path: Path  # ROOT/<digest>
    key: CacheKey
    units: list[list[str]]  # scan tokens of each unit
    feature_dim: int
    layout: StorageLayout = DEFAULT_LAYOUT

    @classmethod
    def create(
        cls,
        root: str | Path,
        key: CacheKey,
        units: list[list[str]],
        feature_dim: int,
        meta: dict,
        layout: StorageLayout | None = None,
    ) -> CacheWriter:
        """Make ``root/<digest>/`` and its manifest (atomically), or check the existing one
        describes the same key, units, feature dim and, when ``layout`` is given, layout. The
        first run's meta stays; without ``layout`` a new cache gets `DEFAULT_LAYOUT` and an
        existing one keeps its own (a resumed cache keeps one layout even if the default changed
        meanwhile)."""
        units = [list(u) for u in units]
        if not units or any(not u for u in units):
            raise ValueError(
                "CacheWriter.create: units must be a non-empty list of non-empty lists"
            )
        tokens = [t for u in units for t in u]
        if len(set(tokens)) != len(tokens):
            dup = sorted(t for t, n in Counter(tokens).items() if n > 1)[:5]
            raise ValueError(f"CacheWriter.create: scan tokens repeated across units: {dup}")
        if feature_dim < 1:
            raise ValueError(f"CacheWriter.create: feature_dim must be >= 1, got {feature_dim}")
        if key.schema_version not in READABLE_VERSIONS:
            raise ValueError(
                f"CacheWriter.create: schema version {key.schema_version} is not one this code "
                f"writes ({', '.join(map(str, READABLE_VERSIONS))})"
            )
        path = Path(root) / key.digest()
        (path / UNITS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": key.schema_version,
            "digest": key.digest(),
            "key": key.to_dict(),
            "feature_dim": feature_dim,
            "layout": asdict(layout or DEFAULT_LAYOUT),
            "units": units,
            "meta": meta,
            "environment": _environment(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        target = path / MANIFEST
        if not target.exists():
            tmp = path / f".{MANIFEST}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "w") as fh:
                json.dump(manifest, fh, indent=1, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)  # atomic and never overwrites a concurrent creator's manifest
                _fsync_dir(path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        existing = _read_json(target, "cache manifest")
        asked_units = json.loads(json.dumps(manifest["units"]))
        held_units = existing.get("units")
        if held_units != asked_units and _flat(held_units) == _flat(asked_units):
            raise CacheError(
                f"cache {path} holds the same scans in units of {_unit_sizes(held_units)}, "
                f"this run asks for units of {_unit_sizes(asked_units)}: resume with the "
                "first run's --scans-per-unit, or delete that folder to start over"
            )
        for name in ("schema_version", "key", "feature_dim", "units"):
            if existing.get(name) != json.loads(json.dumps(manifest[name])):
                raise CacheError(
                    f"cache {path} already exists with a different {name!r} "
                    f"({_short(existing.get(name))} vs {_short(manifest[name])}); "
                    "extract with the same settings, or delete that folder to start over"
                )
        kept = StorageLayout(**existing["layout"])
        if layout is not None and layout != kept:
            raise CacheError(
                f"cache {path} already exists with a different 'layout' "
                f"({_short(asdict(kept))} vs {_short(asdict(layout))}); extract with the same "
                "layout (or none: the cache keeps its own), or delete that folder to start over"
            )
        return cls(path=path, key=key, units=units, feature_dim=feature_dim, layout=kept)

    # -- state --------------------------------------------------------------------------------
    def unit_dir(self, unit_id: int) -> Path:
        return self.path / UNITS_DIR / unit_name(unit_id)

    def marker_path(self, unit_id: int) -> Path:
        return self.path / UNITS_DIR / f"{unit_name(unit_id)}.done"

    def is_complete(self, unit_id: int) -> bool:
        """Marker present and every file it lists present with its recorded size."""
        return not unit_problems(self.path, unit_id, self.units[unit_id], checksums=False)

    def is_finalized(self) -> bool:
        """True once `finalize` wrote the COMPLETE marker."""
        return (self.path / COMPLETE).is_file()

    def pending_units(self, verify_checksums: bool = False) -> list[int]:
        """Units still to write. A unit with a marker whose files fail the check (sizes; also
        checksums with ``verify_checksums``) is pending again, with a warning naming the problem.
        A pending unit loses its marker and its folder (left by a killed writer, or damaged):
        `write_unit` writes it anew. The cache's ``COMPLETE`` goes first. Call it from the run's
        driver, holding `lock()` (no writer of this cache is running yet)."""
        pending = []
        for u, tokens in enumerate(self.units):
            if self.marker_path(u).exists():
                problems = unit_problems(
                    self.path,
                    u,
                    tokens,
                    checksums=verify_checksums,
                    manifest=self._manifest_fields(),
                )
                if not problems:
                    continue
                warnings.warn(f"rewriting {'; '.join(problems)}", stacklevel=2)
            self._drop_complete()  # before any unit loses its marker or its data
            self.marker_path(u).unlink(missing_ok=True)
            self._discard(self.unit_dir(u))
            pending.append(u)
        return pending

    def _drop_complete(self) -> None:
        """Remove the cache's ``COMPLETE`` (one unlink, made durable) before a unit loses its
        marker or is replaced: a run that dies afterwards leaves a cache that says it is
        incomplete, never a complete one with a unit missing."""
        try:
            os.unlink(self.path / COMPLETE)
        except FileNotFoundError:
            return
        _fsync_dir(self.path)

    def _discard(self, unit_dir: Path, keep_whole: bool = False) -> None:
        """Move a unit folder aside (under a temp name, which `remove_stale_temps` finds if we
        die) and delete it. With ``keep_whole``, a folder that turns out to carry a whole record
        (another attempt renamed its unit in after the caller looked) is put back instead."""
        trash = unit_dir.with_name(f".{unit_dir.name}.tmp-{uuid.uuid4().hex}")
        try:
            os.rename(unit_dir, trash)
        except FileNotFoundError:
            return
        if keep_whole and _whole_record(trash) is not None:
            try:
                os.rename(trash, unit_dir)
                return
            except OSError:  # yet another attempt's unit is in place now: keep that one
                pass
        shutil.rmtree(trash, ignore_errors=True)

    def _manifest_fields(self) -> dict[str, Any]:
        """What `unit_problems` checks units against: the key and the feature dim."""
        return {"key": self.key.to_dict(), "feature_dim": self.feature_dim}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cache's writer lock (one extraction run per cache) and remove temp dirs
        left by killed writers: while we hold the lock, nobody else is writing."""
        with cache_lock(self.path):
            self.remove_stale_temps()
            yield

    def remove_stale_temps(self) -> int:
        """Delete the temp folders and files of ``units/`` (``.u00000.tmp-*``,
        ``.u00000.done.tmp-*``); returns how many were removed. Only while holding the lock."""
        stale = list((self.path / UNITS_DIR).glob(".*.tmp-*"))
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return len(stale)

    # -- writing ------------------------------------------------------------------------------
    def write_unit(
        self, unit_id: int, data: UnitData, timings: dict[str, float] | None = None
    ) -> int:
        """Write unit ``unit_id`` atomically; returns bytes written (0 when already complete, or
        when a duplicate attempt's unit got into place first: that one is kept).

        Temp dir with the data and its record (sizes, crc32c checksums and row counts) + fsync +
        one rename + ``.done`` marker (the record, stamped), in that order: a unit without a
        valid marker is never read, and is rewritten by a re-run. ``timings``, when given,
        receives the seconds of the steps: ``arrays_s`` (the Zarr group; files written directly
        are checksummed here, as they are written), ``checksums_s`` (the other files'
        checksums), ``fsync_s`` (record, fsync, rename, marker).
        """
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            if timings is not None:
                clock.append(time.perf_counter())
                timings[name] = timings.get(name, 0.0) + clock[-1] - clock[-2]

        if not 0 <= unit_id < len(self.units):
            raise IndexError(f"unit {unit_id} out of range: cache has {len(self.units)} units")
        if list(data.tokens) != self.units[unit_id]:
            raise ValueError(
                f"unit {unit_name(unit_id)}: tokens differ from the manifest "
                f"(got {len(data.tokens)} scans, expected {len(self.units[unit_id])}, "
                f"first {data.tokens[:1]} vs {self.units[unit_id][:1]})"
            )
        marker_path = self.marker_path(unit_id)
        if marker_path.exists():
            if self.is_complete(unit_id):
                return 0
            self._drop_complete()
            marker_path.unlink(missing_ok=True)  # an invalid marker goes first
        units_dir = self.path / UNITS_DIR
        tmp = units_dir / f".{unit_name(unit_id)}.tmp-{uuid.uuid4().hex}"
        try:
            fmt = self.key.target_format
            written: dict[str, dict[str, Any]] = {}
            stored_rows = write_unit_group(
                tmp, data, self.feature_dim, self.layout, fmt, digests=written
            )
            lap("arrays_s")
            files = _file_digests(tmp, known=written)
            lap("checksums_s")
            # Guard: never mark a group that lost part of its files (e.g. its temp dir was
            # removed under a writer that outlived its run): every array's metadata must be there.
            arrays = unit_arrays(fmt)
            lost = [n for n in arrays if f"{n}/zarr.json" not in files]
            if lost or "zarr.json" not in files:
                raise CacheError(
                    f"unit {unit_name(unit_id)}: written group {tmp.name} lacks arrays {lost} "
                    "(its temp dir was removed while it was written?); not marked done"
                )
            record = {
                "unit": unit_id,
                "schema_version": self.key.schema_version,
                "scans": len(data.tokens),
                "rows": sum(data.rows()),
                "paired": sum(int((c != UNPAIRED).sum()) for c in data.camera),
                "bytes": sum(f["size"] for f in files.values()),
                "arrays": {
                    name: {"rows": stored_rows[name], "digest": _array_digest(files, name)}
                    for name in arrays
                },
                "files": files,
            }
            # The record travels with the data: one rename puts both in place.
            write_group(tmp / UNIT_RECORD, record)
            for rel in [*files, f"{UNIT_RECORD}/zarr.json"]:
                with open(tmp / rel, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp / UNIT_RECORD)
            _fsync_dir(tmp)
            if not self._move_into_place(unit_id, tmp):
                return 0  # a duplicate attempt's unit is in place and marked: ours is gone
            _fsync_dir(units_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._publish(unit_id, record)
        lap("fsync_s")
        return record["bytes"]

    def _move_into_place(self, unit_id: int, tmp: Path) -> bool:
        """Rename the finished unit ``tmp`` (data and record) to the unit's folder; True when it
        got there. A folder already there that carries a whole record is another attempt's unit
        (a Dask retry while the first attempt still runs): it is never replaced; ``tmp`` is
        deleted, that unit's record published as its marker, and False returned. Any other
        folder there (left by a writer killed before its rename under older code, or damaged)
        is replaced, after ``COMPLETE`` is removed. The check is made again before each rename."""
        final = self.unit_dir(unit_id)
        for _ in range(5):
            # Whether a folder is there, first: one that arrives after this look is never
            # moved aside by this pass (our rename then fails, and we look again).
            present = final.exists()
            record = _whole_record(final) if present else None
            if record is not None or (present and self.is_complete(unit_id)):
                shutil.rmtree(tmp)
                if record is not None and not self.is_complete(unit_id):
                    self._publish(unit_id, record)
                return False
            if present:
                self._drop_complete()
                self._discard(final, keep_whole=True)
            try:
                os.rename(tmp, final)
                return True
            except OSError as e:  # another attempt renamed its unit in meanwhile: check it
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        raise CacheError(
            f"unit {unit_name(unit_id)}: {final} keeps being replaced by other writers; not written"
        )

    def _publish(self, unit_id: int, record: dict[str, Any]) -> None:
        """Write the unit's ``.done`` marker (temp + rename): ``record`` stamped (`STAMP`)."""
        _write_json_atomic(
            self.marker_path(unit_id),
            {
                **record,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
        )

    def finalize(self, summary: dict) -> None:
        """All units done → write ``COMPLETE`` (with ``summary``); otherwise raise naming the
        missing units. Removes temp dirs left behind."""
        missing = [u for u in range(len(self.units)) if not self.is_complete(u)]
        if missing:
            raise IncompleteCacheError(
                f"cannot finalize cache {self.path}: {len(missing)} of {len(self.units)} units "
                f"not done ({_unit_list(missing)})"
            )
        self.remove_stale_temps()
        markers = [_read_json(self.marker_path(u), "unit marker") for u in range(len(self.units))]
        _write_json_atomic(
            self.path / COMPLETE,
            {
                "summary": summary,
                "units": len(self.units),
                "scans": sum(m["scans"] for m in markers),
                "points": sum(m["rows"] for m in markers),
                "bytes": sum(m["bytes"] for m in markers),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )


def _short(value: Any, limit: int = 120) -> str:
    s = json.dumps(value, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _unit_list(ids: list[int], limit: int = 8) -> str:
    names = ", ".join(unit_name(u) for u in ids[:limit])
    return names + (f", ... (+{len(ids) - limit})" if len(ids) > limit else "")


# ---------------------------------------------------------------- checking ----
def load_manifest(path: str | Path) -> dict:
    """The manifest of cache ``path``; CacheError naming the path when absent or unreadable,
    SchemaVersionError when written by another schema version."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise CacheError(
            f"{path} is not a cache: no {MANIFEST} in it (a cache folder is ROOT/<digest>/; "
            "`python cli.py cache info ROOT` lists the caches of a root)"
        )
    manifest = _read_json(path / MANIFEST, "cache manifest")
    if not isinstance(manifest, dict):
        raise CacheError(
            f"cache manifest {path / MANIFEST}: expected a JSON object, "
            f"got a {type(manifest).__name__}"
        )
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        older = ", ".join(str(v) for v in READABLE_VERSIONS if v != SCHEMA_VERSION)
        raise SchemaVersionError(
            f"cache {path} has schema version {version}, this code reads version "
            f"{SCHEMA_VERSION} (and {older}): "
            + ("update this code to read it" if newer else "re-extract it with this code")
        )
    key = manifest.get("key")
    key_version = key.get("schema_version") if isinstance(key, dict) else None
    if key_version != version:
        raise CacheError(
            f"cache manifest {path / MANIFEST}: schema version {version}, but its key says "
            f"{key_version} (edited by hand?)"
        )
    problem = _manifest_field_problem(manifest)
    if problem:
        raise CacheError(f"cache manifest {path / MANIFEST}: {problem} (edited by hand?)")
    return manifest


def _manifest_field_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the fields every reader of a manifest uses (None: nothing). The
    key's content is `verify_cache`'s business (it reports a key edited by hand as a problem)."""
    feature_dim = manifest.get("feature_dim")
    if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
        return f"feature_dim must be a positive integer, got {_short(feature_dim)}"
    if not isinstance(manifest.get("digest"), str):
        return f"digest must be a string, got {_short(manifest.get('digest'))}"
    if not isinstance(manifest.get("layout"), dict):
        return f"layout must be an object, got {_short(manifest.get('layout'))}"
    tokens = _flat(manifest.get("units"))
    if tokens is None or not all(isinstance(t, str) for t in tokens):
        return f"units must be a list of lists of scan tokens, got {_short(manifest.get('units'))}"
    return None


def unit_problems(
    path: Path,
    unit_id: int,
    tokens: list[str],
    checksums: bool = True,
    manifest: dict | None = None,
) -> list[str]:
    """Problems of one unit, each naming it; [] when complete and intact.

    Checks the marker, the files it lists (sizes, and that it records a checksum for each; with
    ``checksums`` their crc32c, or sha256 in older markers) and, with ``checksums``, the Zarr
    contents (`_content_problems`): row counts equal, offsets monotonic, ending at rows,
    per-scan target rows or grid views; with ``manifest`` also the unit's target format and
    feature dim against the cache's. Without ``checksums`` the marker must also be the record
    the unit folder carries (`UNIT_RECORD`, absent in units of older code): sizes alone cannot
    tell another attempt's marker from this data's (checksums can).
    """
    name = unit_name(unit_id)
    marker_path = path / UNITS_DIR / f"{name}.done"
    unit_dir = path / UNITS_DIR / name
    if not marker_path.exists():
        return [f"unit {name}: not done (no marker {marker_path.name})"]
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"unit {name}: unreadable marker {marker_path}: {e}"]
    if not unit_dir.is_dir():
        return [f"unit {name}: marker present but folder {unit_dir} missing"]
    problems = []
    for rel, want in files.items():
        p = unit_dir / rel
        if not isinstance(want, dict) or "size" not in want or _checksum_kind(want) is None:
            problems.append(
                f"unit {name}: marker {marker_path.name} records no size and crc32c (or sha256) "
                f"for file {rel}"
            )
        elif not p.is_file():
            problems.append(f"unit {name}: file {rel} missing")
        elif p.stat().st_size != want["size"]:
            problems.append(
                f"unit {name}: file {rel} has {p.stat().st_size} bytes, marker says {want['size']}"
                " (truncated or rewritten)"
            )
        elif checksums and _checksum(p, want) != want[_checksum_kind(want)]:
            problems.append(f"unit {name}: file {rel} checksum mismatch (corrupted)")
    if problems:
        return problems
    if not checksums:
        record = _read_record(unit_dir)
        if record is not None and {k: marker.get(k) for k in record} != record:
            return [
                f"unit {name}: marker {marker_path.name} is not the record of the data in "
                f"{unit_dir.name}/ (another attempt's marker?)"
            ]
        return []
    return _content_problems(unit_dir, name, marker, tokens, manifest)


def _checksum_kind(want: dict[str, Any]) -> str | None:
    """Which checksum a marker entry records: crc32c, or sha256 (markers written before
    2026-11-26); None when it records neither (a problem)."""
    return next((k for k in (CHECKSUM, "sha256") if k in want), None)


def _checksum(path: Path, want: dict[str, Any]) -> str:
    """The checksum of ``path`` of the kind its marker entry ``want`` records."""
    if _checksum_kind(want) == CHECKSUM:
        return file_checksum(path)
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _offsets_problems(
    name: str, what: str, offsets: np.ndarray, scans: int, rows: int, array: str = ""
) -> list[str]:
    if len(offsets) != scans + 1:
        return [f"unit {name}: {len(offsets)} {what} for {scans} scans"]
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        return [f"unit {name}: {what} not monotonic from 0"]
    if offsets[-1] != rows:
        holder = f"{array} has" if array else "arrays have"
        return [f"unit {name}: last of {what} is {offsets[-1]}, {holder} {rows} rows"]
    return []


def _content_problems(
    unit_dir: Path, name: str, marker: dict, tokens: list[str], manifest: dict | None = None
) -> list[str]:
    """Structural checks of a unit's Zarr group against its marker and (when given) the
    manifest: target format, dtype and shape of the row arrays, rows of every array (equal for
    the per-point ones, as in the marker), offsets, and per scan the target rows (point formats:
    its paired points) or grid rows and views (grid formats); quantized formats' scales finite
    and >= 0, one per row."""
    problems = []
    try:
        group = zarr.open_group(zarr.storage.LocalStore(unit_dir, read_only=True), mode="r")
        fmt = group.attrs.get("target_format", DEFAULT_TARGET_FORMAT)
        spec = target_format(fmt)
        if list(group.attrs.get("tokens", [])) != list(tokens):
            problems.append(f"unit {name}: scan tokens differ from the manifest")
        arrays = {n: group[n] for n in unit_arrays(fmt)}
        index = {n: arrays[n][:] for n in (OFFSETS, *spec.index_arrays)}
        camera = arrays["camera"][:]  # (N,)
        quantized = QUANTIZED_FORMATS.get(fmt)  # "target" / "grid": its scales, one per row
        scale = arrays[f"{quantized}_scale"][:] if quantized else None  # (rows,)
    except Exception as e:  # any zarr/codec error means the unit is unreadable
        return [f"unit {name}: unreadable Zarr group: {type(e).__name__}: {e}"]
    feature_dim = None
    if manifest is not None:
        feature_dim = manifest.get("feature_dim")
        want = manifest["key"].get("target_format", DEFAULT_TARGET_FORMAT)
        if fmt != want:
            return [f"unit {name}: target format {fmt!r}, the cache's is {want!r}"]
    for n, (dtype, trailing) in {**POINT_ARRAYS, **spec.row_arrays}.items():
        a = arrays[n]
        dims = tuple((feature_dim or a.shape[-1]) if d == "D" else d for d in trailing)
        if a.dtype != dtype or a.shape[1:] != dims:
            problems.append(
                f"unit {name}: {n} is {a.dtype} {a.shape}, expected {dtype} (rows, "
                f"{', '.join(map(str, dims))})"
            )
    recorded = marker.get("arrays", {})
    for n, a in arrays.items():
        if n in recorded and recorded[n].get("rows") != a.shape[0]:
            problems.append(
                f"unit {name}: {n} has {a.shape[0]} rows, marker says {recorded[n].get('rows')}"
            )
    per_point = {n: arrays[n].shape[0] for n in POINT_ARRAYS}
    n_rows = per_point["points"]
    if len(set(per_point.values())) != 1:
        problems.append(f"unit {name}: per-point arrays have different row counts {per_point}")
    if n_rows != marker.get("rows"):
        problems.append(f"unit {name}: {n_rows} rows stored, marker says {marker.get('rows')}")
    offsets = index[OFFSETS]  # (S + 1,)
    problems += _offsets_problems(name, OFFSETS, offsets, len(tokens), n_rows)
    if problems:
        return problems
    paired = camera != UNPAIRED  # (N,)
    if scale is not None and not np.all(np.isfinite(scale) & (scale >= 0)):
        bad = int((~(np.isfinite(scale) & (scale >= 0))).sum())
        problems.append(f"unit {name}: {quantized}_scale has {bad} negative or non-finite values")
    if not spec.paired_rows:
        grid_rows = arrays["grid"].shape[0]
        if scale is not None and len(scale) != grid_rows:
            problems.append(
                f"unit {name}: grid_scale has {len(scale)} rows for {grid_rows} grid rows"
            )
        return problems + _grid_problems(name, index, grid_rows, camera, paired)
    for n in spec.row_arrays:
        if arrays[n].shape[0] != int(paired.sum()):
            problems.append(
                f"unit {name}: {n} has {arrays[n].shape[0]} rows for {paired.sum()} paired points"
            )
    target_offsets = index[TARGET_OFFSETS]  # (S + 1,)
    problems += _offsets_problems(
        name, TARGET_OFFSETS, target_offsets, len(tokens), arrays["target"].shape[0], "target"
    )
    if not problems:
        cumulative = np.concatenate([[0], np.cumsum(paired)])  # (N + 1,) paired before row
        per_scan = cumulative[offsets[1:]] - cumulative[offsets[:-1]]  # (S,)
        if not np.array_equal(per_scan, np.diff(target_offsets)):
            problems.append(
                f"unit {name}: {TARGET_OFFSETS} disagree with the paired points per scan"
            )
    return problems


def _grid_problems(
    name: str, index: dict[str, np.ndarray], grid_rows: int, camera: np.ndarray, paired: np.ndarray
) -> list[str]:
    """Grid formats' structure: view sizes positive, view and grid offsets monotonic and ending at
    the views / grid rows, each scan's grid rows = the h x w cells of its views, and every
    paired point's camera one of its scan's views."""
    offsets, sizes = index[OFFSETS], index[VIEW_SIZES]  # (S + 1,), (V, 4)
    view_offsets, grid_offsets = index[VIEW_OFFSETS], index[GRID_OFFSETS]  # (S + 1,) each
    scans = len(offsets) - 1
    if sizes.ndim != 2 or sizes.shape[1] != 4 or np.any(sizes < 1):
        return [f"unit {name}: {VIEW_SIZES} must be (views, 4) positive h, w, H0, W0"]
    problems = _offsets_problems(name, VIEW_OFFSETS, view_offsets, scans, len(sizes), VIEW_SIZES)
    problems += _offsets_problems(name, GRID_OFFSETS, grid_offsets, scans, grid_rows, "grid")
    if problems:
        return problems
    cells = np.concatenate([[0], np.cumsum(sizes[:, 0].astype(np.int64) * sizes[:, 1])])  # (V+1,)
    if not np.array_equal(cells[view_offsets], grid_offsets):
        problems.append(f"unit {name}: {GRID_OFFSETS} disagree with the h x w of the views")
    views = np.repeat(np.diff(view_offsets), np.diff(offsets))  # (N,) views of each point's scan
    orphans = int((paired & (camera >= views)).sum())
    if orphans:
        problems.append(f"unit {name}: {orphans} paired points have a camera without a grid view")
    return problems


def verify_cache(path: str | Path, progress: bool = True) -> list[str]:
    """Every problem of the cache at ``path`` (complete or not), each naming its unit or file;
    [] means complete and intact (all checksums recomputed; the manifest's key gives its digest,
    which names the folder)."""
    path = Path(path)
    manifest = load_manifest(path)
    problems = _manifest_problems(path, manifest)
    units = manifest["units"]
    for u in tqdm(range(len(units)), desc="verify", unit="unit", disable=not progress):
        problems += unit_problems(path, u, units[u], checksums=True, manifest=manifest)
    if not (path / COMPLETE).exists():
        problems.append(f"cache {path}: no {COMPLETE} marker (extraction not finalized)")
    else:
        problems += _complete_problems(path / COMPLETE, len(units))
    return problems


def _complete_problems(marker: Path, units: int) -> list[str]:
    """The COMPLETE marker must be what `CacheWriter.finalize` wrote: JSON counting the
    manifest's units (its summary is what `cache info` shows of the extraction)."""
    try:
        record = _read_json(marker, "completion marker")
    except CacheError as e:
        return [str(e)]
    held = record.get("units") if isinstance(record, dict) else None
    if held != units:
        return [f"completion marker {marker}: counts {_short(held)} units, the manifest {units}"]
    return []


def _manifest_problems(path: Path, manifest: dict) -> list[str]:
    """The manifest's key must give its digest, and the digest name the cache folder: a key
    edited by hand (split, pairing...) describes other targets than the stored ones."""
    where = f"cache manifest {path / MANIFEST}"
    try:
        digest = CacheKey.from_dict(manifest["key"]).digest()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return [f"{where}: unreadable key: {e}"]
    problems = []
    if manifest.get("digest") != digest:
        problems.append(
            f"{where}: digest {manifest.get('digest')!r}, but its key's digest is {digest!r} "
            "(edited by hand?)"
        )
    folder = path.resolve().name
    if folder != manifest.get("digest"):
        problems.append(
            f"cache {path}: folder {folder!r} is not named after its digest "
            f"{manifest.get('digest')!r} (renamed, or the manifest edited?)"
        )
    return problems


def cache_info(path: str | Path) -> dict[str, Any]:
    """Summary of the cache at ``path`` (complete or not), from the manifest and markers."""
    path = Path(path)
    manifest = load_manifest(path)
    markers = []
    for u in range(len(manifest["units"])):
        try:
            markers.append(json.loads((path / UNITS_DIR / f"{unit_name(u)}.done").read_text()))
        except (OSError, ValueError):
            pass
    points = sum(m.get("rows", 0) for m in markers)
    paired = sum(m.get("paired", 0) for m in markers)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {
        "path": str(path),
        "digest": manifest["digest"],
        "key": manifest["key"],
        "schema_version": manifest["schema_version"],
        "target_format": manifest["key"].get("target_format", DEFAULT_TARGET_FORMAT),
        "feature_dim": manifest["feature_dim"],
        "layout": manifest["layout"],
        "complete": (path / COMPLETE).exists(),
        "units": len(manifest["units"]),
        "units_done": len(markers),
        "scans": sum(len(u) for u in manifest["units"]),
        "scans_done": sum(m.get("scans", 0) for m in markers),
        "points": points,
        "paired_share": paired / points if points else 0.0,
        "bytes_on_disk": size,
        "created_at": manifest.get("created_at"),
        "meta": manifest.get("meta", {}),
    }


# ---------------------------------------------------------------- finding caches ----
def list_caches(root: str | Path) -> list[Path]:
    """Cache folders (holding a manifest) directly under ``root``, sorted."""
    root = Path(root)
    if root.is_symlink() and not root.exists():
        raise CacheError(f"cache root {root} is a broken symlink (to {os.readlink(root)})")
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache root {root} is not a folder")
    if not root.is_dir():
        raise CacheError(f"cache root {root} does not exist")
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())


def resolve_cache(root_or_path: str | Path, key: CacheKey | None = None) -> Path:
    """The cache folder meant by ``root_or_path``: itself if it holds a manifest, else the
    one cache under it (``key``'s digest when given). Errors name what was found instead and,
    with a key, which key fields differ."""
    p = Path(root_or_path)
    if (p / MANIFEST).is_file():
        if key is not None:
            found = CacheKey.from_dict(load_manifest(p)["key"])
            if found != key:
                raise CacheKeyMismatch(
                    f"cache {p} was extracted with other settings: {', '.join(found.mismatches(key))} differ"
                )
        return p
    caches = list_caches(p)
    if key is not None:
        if (p / key.digest() / MANIFEST).is_file():
            return p / key.digest()
        lines = []
        for c in caches:
            try:
                other = CacheKey.from_dict(_read_json(c / MANIFEST, "cache manifest")["key"])
                lines.append(f"  {c.name}: differs in {', '.join(other.mismatches(key))}")
            except (CacheError, ValueError, KeyError) as e:
                lines.append(f"  {c.name}: unreadable ({e})")
        raise CacheKeyMismatch(
            f"no cache for key {key.digest()} under {p}"
            + (":\n" + "\n".join(lines) if lines else " (it holds no caches)")
            + "\nRun `python cli.py extract-teacher` with these settings first."
        )
    if not caches:
        raise CacheError(f"{p} holds no cache (no {MANIFEST} in it or in its sub-folders)")
    if len(caches) > 1:
        raise CacheError(
            f"{p} holds {len(caches)} caches; name one:\n"
            + "\n".join(f"  {c}: {_key_line(c)}" for c in caches)
        )
    return caches[0]


def _flat(units: Any) -> list | None:
    """The scan tokens of a manifest's units, in order (None if it is not a list of lists)."""
    if not isinstance(units, list) or not all(isinstance(u, list) for u in units):
        return None
    return [t for u in units for t in u]


def _unit_sizes(units: list[list[str]]) -> str:
    """ "4 scans" (the last unit may be shorter), or the sizes when they vary."""
    sizes = sorted({len(u) for u in units[:-1]} or {len(units[-1])})
    return f"{sizes[0]} scans" if len(sizes) == 1 else f"{'/'.join(map(str, sizes))} scans"


def _key_line(path: Path) -> str:
    """What tells one cache from another under a root, in one line."""
    try:
        k = CacheKey.from_dict(_read_json(path / MANIFEST, "cache manifest")["key"])
    except (CacheError, ValueError, KeyError) as e:
        return f"unreadable ({e})"
    h, w = k.image_size
    return (
        f"split {k.split}, teacher {k.teacher} ({k.teacher_weights_sha256[:8]}), {h}x{w}, "
        f"{k.target_format}, {k.teacher_dtype}"
        + (", decoded on the device" if k.image_decode == "device" else "")
    )


# ---------------------------------------------------------------- text for the CLI ----
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def describe(root_or_path: str | Path) -> str:
    """Readable summary of one cache, or a one-line-per-cache list when a root holds several."""
    p = Path(root_or_path)
    caches = [p] if (p / MANIFEST).is_file() else list_caches(p)
    if not caches:
        raise CacheError(f"{p} holds no cache (no {MANIFEST} in it or in its sub-folders)")
    if len(caches) > 1:
        lines = [f"{len(caches)} caches under {p}:"]
        for c in caches:
            i = cache_info(c)
            k = i["key"]
            state = "complete" if i["complete"] else f"{i['units_done']}/{i['units']} units"
            lines.append(
                f"  {c.name}  {k['split']:>10s}  {k['teacher']}  {k['image_size']}  "
                f"{i['target_format']}  "
                f"D={i['feature_dim']}  {i['scans']} scans  {_size(i['bytes_on_disk'])}  {state}"
            )
        return "\n".join(lines)
    i = cache_info(caches[0])
    state = "yes" if i["complete"] else f"NO ({i['units'] - i['units_done']} units missing)"
    lines = [
        f"cache      {i['path']}",
        f"complete   {state}",
        f"schema     v{i['schema_version']}   feature dim {i['feature_dim']}   layout {i['layout']}",
        f"targets    {i['target_format']}",
        *(f"key.{k:<22s} {v}" for k, v in i["key"].items()),
        f"units      {i['units_done']}/{i['units']} done",
        f"scans      {i['scans_done']}/{i['scans']} written",
        f"points     {i['points']}  (paired share {i['paired_share']:.1%})",
        f"size       {_size(i['bytes_on_disk'])}"
        + (f"  ({i['bytes_on_disk'] / i['points']:.0f} bytes/point)" if i["points"] else ""),
        f"created    {i['created_at']}",
    ]
    return "\n".join(lines)
