"""Direct reads of row ranges from uncompressed Zarr v3 sharded arrays (docs/cache-format.md).

zarr-python costs ~2 ms of fixed overhead per ``array[start:end]`` plus extra copies; the
cache's default layout needs none of its machinery: each per-point array of a unit is ONE shard
file of k inner chunks stored as raw little-endian bytes, located by the shard index (Zarr v3
``sharding_indexed`` codec). `ShardArray.open` parses the array's ``zarr.json``, accepts only that
exact layout (anything else returns None: the caller reads through zarr) and reads the shard
index once, checking its crc32c and every chunk's byte range against the file. `ShardArray.read`
then maps the shard file and copies the requested rows of each overlapped chunk straight into
the output (one copy). The file is opened per read: no file handle is kept, so a reader can
cover any number of units (a kept ``np.memmap`` holds a file descriptor each).

Corruption (truncated file, index checksum, chunk outside the file, missing shard) raises
`CacheError` naming the file; nothing is returned from bytes that failed a check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own crc32c implementation (a dependency of zarr >= 3)
import numpy as np

from cache.schema import CacheError

EMPTY = 2**64 - 1
"""Offset and byte count of an absent inner chunk in a shard index (read as the fill value)."""
INDEX_ENTRY_BYTES = 16
"""One shard index entry: uint64 offset, uint64 nbytes (little endian)."""
CRC_BYTES = 4
DTYPES = frozenset(
    ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
     "float16", "float32", "float64")
)  # fmt: skip
"""Zarr v3 data types read directly (fixed-size numbers; anything else goes through zarr)."""
LITTLE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
CRC32C = {"name": "crc32c"}


def _layout(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The fields `ShardArray` needs from an array's ``zarr.json``, or None when the array is not
    the layout `write_unit_group` makes uncompressed: 1-D or 2-D, a regular grid with ONE shard
    along axis 0 covering the array (and whole rows), inner chunks of whole rows encoded by the
    ``bytes`` codec only (little endian; no compressor, no transpose), index of uint64 pairs
    (+ crc32c) at either end, default chunk keys, a numeric fill value."""
    shape = meta.get("shape")
    dtype = meta.get("data_type")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or dtype not in DTYPES:
        return None
    if meta.get("storage_transformers") or not isinstance(shape, list) or len(shape) not in (1, 2):
        return None
    grid, keys, codecs = meta.get("chunk_grid"), meta.get("chunk_key_encoding"), meta.get("codecs")
    if not isinstance(grid, dict) or grid.get("name") != "regular":
        return None
    if not isinstance(keys, dict) or keys.get("name") != "default":
        return None
    separator = (keys.get("configuration") or {}).get("separator", "/")
    if separator not in ("/", ".") or not isinstance(codecs, list) or len(codecs) != 1:
        return None
    if not isinstance(codecs[0], dict) or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0].get("configuration") or {}
    shard = (grid.get("configuration") or {}).get("chunk_shape")
    inner = conf.get("chunk_shape")
    if not all(isinstance(s, list) and len(s) == len(shape) for s in (shard, inner)):
        return None
    if not all(isinstance(v, int) and v >= 0 for v in (*shape, *shard, *inner)):
        return None
    if shard[1:] != shape[1:] or inner[1:] != shape[1:]:  # whole rows in every chunk
        return None
    if inner[0] < 1 or shard[0] < max(1, shape[0]) or shard[0] % inner[0]:  # 1 shard, k chunks
        return None
    raw_bytes = [[LITTLE_BYTES]]  # zarr writes no endian for 1-byte types
    if np.dtype(dtype).itemsize == 1:
        raw_bytes.append([{"name": "bytes"}])
    if conf.get("codecs") not in raw_bytes:
        return None
    index_codecs = conf.get("index_codecs")
    if index_codecs not in ([LITTLE_BYTES], [LITTLE_BYTES, CRC32C]):
        return None
    location = conf.get("index_location", "end")
    fill = meta.get("fill_value")  # a number; NaN/Infinity are strings in zarr.json
    if location not in ("start", "end") or type(fill) not in (int, float):
        return None
    return {
        "shape": tuple(shape),
        "dtype": np.dtype(dtype).newbyteorder("<"),
        "chunk_rows": inner[0],
        "chunks": shard[0] // inner[0],
        "fill_value": fill,
        "index_at_end": location == "end",
        "checksum": index_codecs[-1] == CRC32C,
        "key": "c" + separator + separator.join("0" * len(shape)),
    }


@dataclass
class ShardArray:
    """Row reads of one uncompressed single-shard Zarr v3 array (see the module docstring).

    Holds the parsed shard index, not an open file: picklable, and nothing to close.
    """

    shard: Path
    """The shard file (``ARRAY/c/0/0`` for 2-D, ``ARRAY/c/0`` for 1-D)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    """Rows per inner chunk; chunk k holds rows [k * chunk_rows, (k + 1) * chunk_rows)."""
    n_chunks: int
    fill_value: int | float
    index_at_end: bool
    checksum: bool
    chunk_offsets: list[int] = field(default_factory=list)
    """(n_chunks,) byte offset of each inner chunk in the shard file, -1 = absent (fill value);
    [] when the shard file does not exist (all fill value)."""
    identity: tuple[int, int, int] | None = None
    """(inode, size, mtime ns) of the shard file whose index `chunk_offsets` holds."""

    @classmethod
    def open(cls, array_dir: Path, missing_ok: bool = False) -> ShardArray | None:
        """The array at ``array_dir`` (a folder holding ``zarr.json``) with its shard index read
        and checked, or None when its layout is not one this module reads (use zarr).

        A missing shard file means "all fill value" in Zarr (a writer skips all-fill shards):
        accepted only with ``missing_ok``, else `CacheError` (the file was lost)."""
        meta_path = array_dir / "zarr.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"array metadata {meta_path} unreadable: {e}") from None
        layout = _layout(meta) if isinstance(meta, dict) else None
        if layout is None:
            return None
        array = cls(
            shard=array_dir / layout["key"],
            shape=layout["shape"],
            dtype=layout["dtype"],
            chunk_rows=layout["chunk_rows"],
            n_chunks=layout["chunks"],
            fill_value=layout["fill_value"],
            index_at_end=layout["index_at_end"],
            checksum=layout["checksum"],
        )
        try:
            with open(array.shard, "rb") as fh:
                array._read_index(fh.fileno())
        except FileNotFoundError:
            if not missing_ok:
                raise CacheError(f"shard file {array.shard} missing") from None
        return array

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (a chunk holds ``chunk_rows`` of them, padding included)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _read_index(self, fd: int) -> None:
        """Read, check and keep the shard index of the open shard file ``fd``."""
        st = os.fstat(fd)
        size = st.st_size
        index_bytes = self.n_chunks * INDEX_ENTRY_BYTES + (CRC_BYTES if self.checksum else 0)
        if size < index_bytes:
            raise CacheError(
                f"shard {self.shard}: {size} bytes, less than its {index_bytes}-byte index "
                "(truncated)"
            )
        raw = os.pread(fd, index_bytes, size - index_bytes if self.index_at_end else 0)
        if len(raw) != index_bytes:
            raise CacheError(f"shard {self.shard}: short read of its index (truncated)")
        if self.checksum:
            stored = int.from_bytes(raw[-CRC_BYTES:], "little")
            if google_crc32c.value(raw[:-CRC_BYTES]) != stored:
                raise CacheError(
                    f"shard {self.shard}: index checksum mismatch (corrupted or truncated; "
                    "run `python cli.py cache verify`)"
                )
        entries = np.frombuffer(raw, "<u8", count=2 * self.n_chunks).reshape(-1, 2).tolist()
        data_start, data_end = (0, size - index_bytes) if self.index_at_end else (index_bytes, size)
        chunk_bytes = self.chunk_rows * self.row_bytes
        offsets = []
        for k, (offset, nbytes) in enumerate(entries):
            if offset == EMPTY and nbytes == EMPTY:
                offsets.append(-1)
                continue
            if nbytes != chunk_bytes:
                raise CacheError(
                    f"shard {self.shard}: inner chunk {k} holds {nbytes} bytes, an uncompressed "
                    f"chunk of {self.chunk_rows} rows has {chunk_bytes} (corrupted index)"
                )
            if not data_start <= offset <= data_end - nbytes:
                raise CacheError(
                    f"shard {self.shard}: inner chunk {k} at bytes {offset}..{offset + nbytes} "
                    f"lies outside the data [{data_start}, {data_end}) (corrupted or truncated)"
                )
            offsets.append(offset)
        self.chunk_offsets = offsets
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end) as a new (end - start, *shape[1:]) array, equal to zarr's
        ``array[start:end]``; requires 0 <= start <= end <= rows."""
        if not 0 <= start <= end <= self.shape[0]:
            raise IndexError(f"rows [{start}, {end}) outside [0, {self.shape[0]}) of {self.shard}")
        out = np.empty((end - start, *self.shape[1:]), self.dtype)
        if start == end:
            return out
        try:
            fh = open(self.shard, "rb")
        except FileNotFoundError:
            if self.identity is not None:  # had a shard when opened: lost since
                raise CacheError(f"shard file {self.shard} missing") from None
            out.fill(self.fill_value)
            return out
        with fh:
            st = os.fstat(fh.fileno())
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                self._read_index(fh.fileno())  # the file was replaced (a unit rewritten)
            data = np.memmap(fh, dtype=np.uint8, mode="r")  # (file bytes,), mapped
            rows, row_bytes = self.chunk_rows, self.row_bytes
            for k in range(start // rows, (end - 1) // rows + 1):
                lo, hi = max(start, k * rows), min(end, (k + 1) * rows)  # rows of chunk k
                dst = out[lo - start : hi - start]
                offset = self.chunk_offsets[k]
                if offset < 0:
                    dst.fill(self.fill_value)
                    continue
                first = offset + (lo - k * rows) * row_bytes
                src = data[first : first + (hi - lo) * row_bytes]
                dst[...] = src.view(self.dtype).reshape(dst.shape)
        return out
