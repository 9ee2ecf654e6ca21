"""Reader of complete target caches: `open_cache` and `CacheReader` (random access per scan).

Format: `docs/cache-format.md`; names: `cache/schema.py`; uncompressed shards are read directly
(`cache/shardread.py`), everything else through zarr. The writer and the checks are
`cache/store.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cache.schema import (
    COMPLETE,
    DEFAULT_TARGET_FORMAT,
    GRID_OFFSETS,
    MANIFEST,
    OFFSETS,
    POINT_ARRAYS,
    TARGET_OFFSETS,
    UNITS_DIR,
    UNPAIRED,
    VIEW_OFFSETS,
    VIEW_SIZES,
    CacheError,
    CacheKey,
    IncompleteCacheError,
    ScanTargets,
    dequantize_rows,
    target_format,
    unit_name,
)
from cache.shardread import ShardArray
from cache.store import (
    _read_json,
    _unit_list,
    cache_info,
    load_manifest,
    row_arrays,
    verify_cache,
)

MAX_OPEN_UNITS = 64
"""Units a `CacheReader` keeps open (least recently used dropped first). Each holds its arrays,
offsets and paths: ~20 KB of memory (direct reads), ~90 KB (through zarr); kept for every unit
read, a DataLoader worker reading a whole cache of thousands of units grew by hundreds of MB.
Reopening a unit costs a few ms (4-14 ms measured, files in the page cache)."""


def open_cache(path: str | Path, fast_path: bool = True) -> CacheReader:
    """Open a complete cache for reading; refuses incomplete caches and other schema versions.
    ``fast_path=False`` reads every array through zarr (see `CacheReader.fast_path`)."""
    path = Path(path)
    manifest = load_manifest(path)
    if not (path / COMPLETE).exists():
        n = len(manifest["units"])
        missing = [u for u in range(n) if not (path / UNITS_DIR / f"{unit_name(u)}.done").exists()]
        raise IncompleteCacheError(
            f"cache {path} is incomplete: {len(missing)} of {n} units missing"
            + (f" ({_unit_list(missing)})" if missing else " (all units done, not finalized)")
            + ". Re-run the same `python cli.py extract-teacher` command to resume: "
            "finished units are kept."
        )
    return CacheReader(path, fast_path=fast_path)


def _span(offsets: np.ndarray, j: int) -> tuple[int, int]:
    """[start, end) of scan ``j`` in an offsets array."""
    return int(offsets[j]), int(offsets[j + 1])


def _rows(array: ShardArray | zarr.Array, start: int, end: int) -> np.ndarray:
    """Rows [start, end) of a row array (per-point or target), read directly or through zarr
    (whose errors, a shard index checksum or a codec's, name no file: CacheError naming it)."""
    if isinstance(array, ShardArray):
        return array.read(start, end)
    try:
        return array[start:end]
    except (ValueError, OSError) as e:  # a damaged index or chunk, a missing file
        shard = (start // (array.shards or array.chunks)[0],) + (0,) * (array.ndim - 1)
        where = Path(str(array.store.root), array.path, array.metadata.encode_chunk_key(shard))
        raise CacheError(
            f"{where}: rows [{start}, {end}) unreadable: {type(e).__name__}: {e} "
            "(corrupted; run `python cli.py cache verify`)"
        ) from None


@dataclass
class _OpenUnit:
    arrays: dict[str, ShardArray | zarr.Array]  # row arrays: direct reader, else zarr
    index: dict[str, np.ndarray]  # small arrays read whole: offsets, target_offsets / views...
    lidar_paths: list[str]


@dataclass
class CacheReader:
    """Random access to the scans of a complete cache. Picklable (DataLoader workers): opened
    units are dropped when pickled and reopened lazily on first read."""

    path: Path
    fast_path: bool = True
    """Read uncompressed sharded arrays directly (`cache/shardread.py`); False: zarr only."""
    key: CacheKey = field(init=False)
    feature_dim: int = field(init=False)
    tokens: list[str] = field(init=False)  # all scans, unit after unit
    meta: dict = field(init=False)
    _unit_of: np.ndarray = field(init=False, repr=False)  # (S,) unit of each scan
    _index_in_unit: np.ndarray = field(init=False, repr=False)  # (S,) position inside it
    _open: dict[int, _OpenUnit] = field(init=False, repr=False, default_factory=dict)
    """Opened units, least recently used first; at most `MAX_OPEN_UNITS`."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        manifest = load_manifest(self.path)
        try:
            self.key = CacheKey.from_dict(manifest["key"])
        except (ValueError, KeyError) as e:
            raise CacheError(f"cache manifest {self.path / MANIFEST}: bad key: {e}") from None
        self.feature_dim = int(manifest["feature_dim"])
        self.meta = manifest.get("meta", {})
        units = manifest["units"]
        self.tokens = [t for u in units for t in u]
        self._unit_of = np.repeat(np.arange(len(units)), [len(u) for u in units])
        self._index_in_unit = np.concatenate([np.arange(len(u)) for u in units])
        self._open = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # opened units (zarr handles) are not shared across processes
        return state

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def target_format(self) -> str:
        """How the targets are stored (`TARGET_FORMATS`); `read_scan` hides it."""
        return self.key.target_format

    def _unit(self, u: int) -> _OpenUnit:
        unit = self._open.pop(u, None)
        if unit is None:
            unit_dir = self.path / UNITS_DIR / unit_name(u)
            try:
                unit = self._open_unit(unit_dir)
            except (ValueError, OSError, KeyError) as e:  # zarr's: a garbled zarr.json, an
                # array missing, a file for a folder (most name no file)
                raise CacheError(
                    f"cache unit {unit_dir} unreadable: {type(e).__name__}: {e} "
                    "(corrupted; run `python cli.py cache verify`)"
                ) from None
        self._open[u] = unit  # the most recently used last
        while len(self._open) > MAX_OPEN_UNITS:
            del self._open[next(iter(self._open))]
        return unit

    def _open_unit(self, unit_dir: Path) -> _OpenUnit:
        """The unit group at ``unit_dir``, its row arrays and small index arrays."""
        group = zarr.open_group(zarr.storage.LocalStore(unit_dir, read_only=True), mode="r")
        fmt = group.attrs.get("target_format", DEFAULT_TARGET_FORMAT)
        if fmt != self.target_format:
            raise CacheError(
                f"cache {self.path} unit {unit_dir.name}: target format {fmt!r}, the "
                f"cache's is {self.target_format!r} (run `python cli.py cache verify`)"
            )
        names = row_arrays(fmt)
        arrays: dict[str, ShardArray | zarr.Array] = {}
        if self.fast_path:
            # The marker lists the unit's files: a shard it lists must exist (Zarr omits
            # only shards that hold nothing but the fill value).
            marker = _read_json(unit_dir.with_name(f"{unit_dir.name}.done"), "unit marker")
            for name in names:
                stored = any(rel.startswith(f"{name}/c") for rel in marker.get("files", {}))
                fast = ShardArray.open(unit_dir / name, missing_ok=not stored)
                if fast is not None:
                    arrays[name] = fast
        return _OpenUnit(
            arrays={n: arrays[n] if n in arrays else group[n] for n in names},
            index={n: group[n][:] for n in (OFFSETS, *target_format(fmt).index_arrays)},
            lidar_paths=list(group.attrs["lidar_paths"]),
        )

    def num_points(self, i: int) -> int:
        """Points of scan ``i`` (reads only the unit's offsets)."""
        unit = self._unit(int(self._unit_of[i]))
        j = int(self._index_in_unit[i])
        offsets = unit.index[OFFSETS]
        return int(offsets[j + 1] - offsets[j])

    def read_scan(self, i: int) -> ScanTargets:
        """Scan ``i`` (0 <= i < len): one read per row array (direct for uncompressed shards,
        else zarr), `target` (N, D) float16 with zero rows where unpaired, whatever the target
        format: point-f16 rows scattered back, point-i8 rows dequantized, grid-f16 grids (grid-i8:
        dequantized) sampled at the paired points' pixels (`cache/sampling.py`)."""
        if not 0 <= i < len(self.tokens):
            raise IndexError(f"scan {i} out of range: cache {self.path} has {len(self)} scans")
        u, j = int(self._unit_of[i]), int(self._index_in_unit[i])
        unit = self._unit(u)
        start, end = _span(unit.index[OFFSETS], j)
        fields = {name: _rows(unit.arrays[name], start, end) for name in POINT_ARRAYS}
        paired = fields["camera"] != UNPAIRED  # (N,)
        where = f"cache {self.path} unit {unit_name(u)} scan {self.tokens[i]}"
        target = np.zeros((end - start, self.feature_dim), np.float16)  # (N, D)
        if target_format(self.target_format).paired_rows:
            t_start, t_end = _span(unit.index[TARGET_OFFSETS], j)
            if t_end - t_start != int(paired.sum()) or t_end > unit.arrays["target"].shape[0]:
                raise CacheError(
                    f"{where}: {t_end - t_start} target rows for {paired.sum()} paired points "
                    "(corrupted; run `python cli.py cache verify`)"
                )
            stored = _rows(unit.arrays["target"], t_start, t_end)  # (P, D)
            if self.target_format == "point-i8":
                scale = _rows(unit.arrays["target_scale"], t_start, t_end)  # (P,)
                stored = dequantize_rows(stored, scale)
            target[paired] = stored
        else:
            target[paired] = self._sample_grids(unit, j, fields, paired, where)
        return ScanTargets(
            token=self.tokens[i], lidar_path=unit.lidar_paths[j], target=target, **fields
        )

    def _sample_grids(
        self, unit: _OpenUnit, j: int, fields: dict[str, np.ndarray], paired: np.ndarray, where: str
    ) -> np.ndarray:
        """(P, D) float16 features of the paired points of scan ``j`` sampled from its stored
        grids (grid formats; grid-i8 dequantized first), exactly as extraction samples them."""
        from cache.sampling import sample_view_grids  # torch: only grid caches need it

        v_start, v_end = _span(unit.index[VIEW_OFFSETS], j)
        g_start, g_end = _span(unit.index[GRID_OFFSETS], j)
        sizes = unit.index[VIEW_SIZES][v_start:v_end]  # (V_j, 4) h, w, H0, W0
        camera = fields["camera"][paired]  # (P,)
        cells = int((sizes[:, 0].astype(np.int64) * sizes[:, 1]).sum())
        quantized = "grid_scale" in unit.arrays  # grid-i8
        stored = [unit.arrays[n] for n in ("grid", "grid_scale") if n in unit.arrays]
        fits = g_end - g_start == cells and all(g_end <= a.shape[0] for a in stored)
        if not fits or (len(camera) and int(camera.max()) >= len(sizes)):
            raise CacheError(
                f"{where}: {g_end - g_start} grid rows and {len(sizes)} views do not fit its "
                "points (corrupted; run `python cli.py cache verify`)"
            )
        grid = _rows(unit.arrays["grid"], g_start, g_end)  # (sum h*w, D) float16; grid-i8: int8
        if quantized:
            grid = dequantize_rows(grid, _rows(unit.arrays["grid_scale"], g_start, g_end))
        return sample_view_grids(grid, sizes, camera, fields["uv"][paired])

    def verify(self, progress: bool = True) -> list[str]:
        """Problems of this cache, each naming its unit; [] = complete and intact."""
        return verify_cache(self.path, progress=progress)

    def info(self) -> dict[str, Any]:
        """Key fields, scans, points, paired share, size on disk, completeness."""
        return cache_info(self.path)
