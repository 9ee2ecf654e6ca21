"""Direct writes of a unit's uncompressed Zarr v3 group (the layout `cache/shardread.py` reads),
byte for byte what zarr-python writes (tests/test_cache.py compares whole folders).

Why: a unit's targets are ~2.9 MB per camera image (ViT-S/14, point-f16); zarr-python's codec
pipeline costs ~1 ms of CPU per MB on top of the write (chunk copies, shard assembly, its event
loop), ~4x a plain write, and each array or group it creates ~1.5 ms more (existence checks and
metadata writes through its asyncio loop; docs/benchmarks.md). On a GPU node that CPU time is
what keeps the teacher waiting. This module writes, for uncompressed arrays:

- a row array (`write_sharded_array`): one shard file ``c/0[/0]`` holding the array cut into
  ``n_chunks`` inner chunks of ``chunk_rows`` whole rows, the last one padded with the fill value
  0 to full size; raw little-endian bytes (the ``bytes`` codec). An inner chunk whose bytes are
  all zero is left out (zarr's ``write_empty_chunks=False``; a float chunk of -0.0 is not
  "empty": zarr compares bit patterns) and its index entry is (2^64 - 1, 2^64 - 1); chunks that
  are kept follow each other in row order. At the end, the index: (n_chunks, 1 per trailing
  axis, 2) little-endian uint64 (offset, nbytes), then its crc32c (4 bytes, little endian). No
  shard file when every chunk is empty (or the array has no rows), as zarr;
- a small index array (`write_plain_array`): one unsharded chunk ``c/0[/0]`` of the whole array
  (raw bytes; none when all zero or empty);
- each ``zarr.json`` (`write_group`, and the arrays'): zarr-python's own document for the same
  array, made once per process and signature (dtype, trailing shape, sharded or not) by
  zarr-python in memory, with the row counts filled in.

Each file's crc32c is computed from the buffers as they are written (no read-back): the `.done`
marker records it (`file_checksum` computes it from a file, to verify).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from cache.shardread import EMPTY

CHECKSUM = "crc32c"
"""The `.done` marker's per-file checksum (markers written before 2026-11-26 carry sha256)."""
_BLOCK = 8 << 20  # bytes read at a time by `file_checksum`


def file_checksum(path: Path) -> str:
    """crc32c of a file's bytes, 8 hex digits (what the `.done` marker records)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            crc = google_crc32c.extend(crc, block)
    return f"{crc:08x}"


def shard_key(ndim: int) -> str:
    """The chunk or shard file's key under its array folder: ``c/0`` (1-D) or ``c/0/0`` (2-D)."""
    return "/".join(["c"] + ["0"] * ndim)


def _write_file(path: Path, pieces: list[np.ndarray | bytes]) -> dict[str, Any]:
    """Write ``pieces`` (bytes, 1-D uint8 arrays) one after another as ``path``; returns its
    {"size", "crc32c"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    crc, size = 0, 0
    with open(path, "wb") as fh:
        for piece in pieces:
            fh.write(piece)
            if isinstance(piece, np.ndarray):  # google_crc32c takes read-only buffers only
                piece = piece.view()
                piece.flags.writeable = False
            crc = google_crc32c.extend(crc, piece)
            size += len(piece)
    if os.path.getsize(path) != size:  # a full disk shows up here, not later
        raise OSError(f"{path}: wrote {os.path.getsize(path)} bytes, expected {size}")
    return {"size": size, CHECKSUM: f"{crc:08x}"}


@functools.cache
def _template(kind: str, dtype: str = "", trailing: tuple[int, ...] = ()) -> str:
    """zarr-python's ``zarr.json`` for a group (kind "group", no attributes) or an array (kind
    "sharded" / "plain", 1 row, chunks of 1 row) of ``dtype`` and ``trailing`` shape."""
    written: dict[str, Any] = {}
    store = zarr.storage.MemoryStore(written)
    if kind == "group":
        zarr.create_group(store)
    else:
        shape = (1, *trailing)
        shards = {"shards": shape} if kind == "sharded" else {}
        zarr.create_array(
            store, shape=shape, dtype=dtype, chunks=shape, compressors=(), fill_value=0, **shards
        )
    return written["zarr.json"].to_bytes().decode()


def _metadata(
    kind: str, dtype: np.dtype, shape: tuple[int, ...], chunk_rows: int, shard_rows: int = 0
) -> bytes:
    """``zarr.json`` of an array of ``dtype`` and ``shape`` as zarr-python writes it: chunks of
    ``chunk_rows`` rows (inner chunks when sharded) in shards of ``shard_rows`` rows (kind
    "sharded")."""
    doc = json.loads(_template(kind, dtype.newbyteorder("<").str, tuple(shape[1:])))
    doc["shape"][0] = shape[0]
    outer = doc["chunk_grid"]["configuration"]["chunk_shape"]
    if kind == "sharded":
        outer[0] = shard_rows
        doc["codecs"][0]["configuration"]["chunk_shape"][0] = chunk_rows
    else:
        outer[0] = chunk_rows
    return json.dumps(doc, indent=2, allow_nan=True).encode()


def write_group(path: Path, attributes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The group's ``zarr.json`` (``path`` is created); returns {"zarr.json": {size, crc32c}}."""
    doc = json.loads(_template("group"))
    doc["attributes"] = attributes
    body = json.dumps(doc, indent=2, allow_nan=True).encode()
    return {"zarr.json": _write_file(path / "zarr.json", [body])}


def _rows_view(parts: list[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
    """Rows [start, stop) of the row-wise concatenation of ``parts``, as views of the parts."""
    out, offset = [], 0
    for p in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, len(p))
        if lo < hi:
            out.append(p[lo:hi])
        offset += len(p)
        if offset >= stop:
            break
    return out


def _bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a 1-D uint8 view."""
    return a.reshape(-1).view(np.uint8)


def write_sharded_array(
    array_dir: Path, parts: list[np.ndarray], chunk_rows: int, n_chunks: int
) -> dict[str, dict[str, Any]]:
    """Write the array that is the row-wise concatenation of ``parts`` (each 1-D or 2-D, the
    same dtype and trailing shape; none copied) under ``array_dir``, as zarr-python writes it
    for inner chunks of ``chunk_rows`` rows and one shard of ``n_chunks`` chunks (uncompressed,
    index at the end with crc32c, fill value 0): its ``zarr.json`` and, unless every chunk is
    all zero, its shard file. Returns {path relative to ``array_dir``: {size, crc32c}}."""
    if not parts:
        raise ValueError("write_sharded_array: no parts (pass one empty array for no rows)")
    first = parts[0]
    if first.ndim not in (1, 2):
        raise ValueError(f"write_sharded_array: 1-D or 2-D arrays only, got shape {first.shape}")
    for p in parts:
        if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"write_sharded_array: parts differ: {p.dtype}{p.shape} vs {first.dtype}"
                f"{first.shape}"
            )
    rows = sum(len(p) for p in parts)
    if n_chunks * chunk_rows < rows:
        raise ValueError(
            f"write_sharded_array: {n_chunks} chunks of {chunk_rows} rows cannot hold {rows} rows"
        )
    little = first.dtype.newbyteorder("<")
    data = [np.ascontiguousarray(p, dtype=little) for p in parts]
    meta = _metadata("sharded", little, (rows, *first.shape[1:]), chunk_rows, n_chunks * chunk_rows)
    written = {"zarr.json": _write_file(array_dir / "zarr.json", [meta])}
    index = np.full((n_chunks, 2), EMPTY, dtype="<u8")
    row_bytes = little.itemsize * int(np.prod(first.shape[1:], dtype=np.int64))
    chunk_bytes = chunk_rows * row_bytes
    pieces: list[np.ndarray] = []
    offset = 0
    for k in range(min(n_chunks, -(-rows // chunk_rows))):
        views = _rows_view(data, k * chunk_rows, (k + 1) * chunk_rows)
        chunk = [_bytes(v) for v in views]
        if not any(c.any() for c in chunk):  # all zero bytes: the fill value, not stored
            continue
        short = chunk_bytes - sum(len(c) for c in chunk)
        if short:  # the last chunk, padded with the fill value
            chunk.append(np.zeros(short, np.uint8))
        pieces += chunk
        index[k] = (offset, chunk_bytes)
        offset += chunk_bytes
    if not pieces:
        return written
    index_bytes = index.reshape(n_chunks, *([1] * (first.ndim - 1)), 2).tobytes()
    crc = google_crc32c.value(index_bytes).to_bytes(4, "little")
    key = shard_key(first.ndim)
    written[key] = _write_file(array_dir / key, [*pieces, index_bytes, crc])
    return written


def write_plain_array(array_dir: Path, arr: np.ndarray) -> dict[str, dict[str, Any]]:
    """Write ``arr`` (1-D or 2-D) under ``array_dir`` as one unsharded, uncompressed chunk of its
    whole shape (at least 1 row), as zarr-python writes it: ``zarr.json`` and, unless ``arr`` is
    empty or all zero, the chunk file. Returns {path relative to ``array_dir``: {size, crc32c}}."""
    if arr.ndim not in (1, 2) or 0 in arr.shape[1:]:
        raise ValueError(f"write_plain_array: 1-D or 2-D arrays with columns, got {arr.shape}")
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    meta = _metadata("plain", data.dtype, data.shape, max(1, len(data)))
    written = {"zarr.json": _write_file(array_dir / "zarr.json", [meta])}
    if len(data) and _bytes(data).any():
        key = shard_key(data.ndim)
        written[key] = _write_file(array_dir / key, [_bytes(data)])
    return written
