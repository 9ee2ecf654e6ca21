"""Direct writes of the shard file of an uncompressed single-shard Zarr v3 array (the layout
`cache/shardread.py` reads), byte for byte what zarr-python writes (tests/test_cache.py
compares whole unit folders).

Why: a unit's targets are ~2.9 MB per camera image (ViT-S/14, point-f16); zarr-python's codec
pipeline costs ~1 ms of CPU per MB on top of the write (chunk copies, shard assembly, its event
loop), ~4x a plain write (docs/benchmarks.md). On a GPU node that CPU time is what keeps the
teacher waiting. zarr still writes every ``zarr.json`` (`zarr.create_array` without data); this
module writes only the ``c/0[/0]`` shard file:

- the array cut into ``n_chunks`` inner chunks of ``chunk_rows`` whole rows, the last one padded
  with the fill value 0 to full size; raw little-endian bytes (the ``bytes`` codec);
- an inner chunk whose bytes are all zero is left out (zarr's ``write_empty_chunks=False``; a
  float chunk of -0.0 is not "empty": zarr compares bit patterns) and its index entry is
  (2^64 - 1, 2^64 - 1); chunks that are kept follow each other in row order;
- at the end, the index: (n_chunks, 1 per trailing axis, 2) little-endian uint64 (offset,
  nbytes), then its crc32c (4 bytes, little endian);
- no file at all when every chunk is empty (or the array has no rows), as zarr.

The sha256 of the file is computed from the buffers while writing (no read-back).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from cache.shardread import EMPTY


@dataclass(frozen=True)
class WrittenShard:
    """A shard file written by `write_shard`."""

    path: Path
    size: int
    sha256: str


def shard_key(ndim: int) -> str:
    """The shard file's key under its array folder: ``c/0`` (1-D) or ``c/0/0`` (2-D)."""
    return "/".join(["c"] + ["0"] * ndim)


def write_shard(
    array_dir: Path, arr: np.ndarray, chunk_rows: int, n_chunks: int
) -> WrittenShard | None:
    """Write the shard file of ``arr`` (1-D or 2-D, C order, any byte order) under
    ``array_dir`` as zarr-python writes it for inner chunks of ``chunk_rows`` rows and one shard
    of ``n_chunks`` chunks (uncompressed, index at the end with crc32c, fill value 0). Returns
    the file written, or None when zarr would write none (no rows, or every chunk all zero)."""
    if arr.ndim not in (1, 2):
        raise ValueError(f"write_shard: 1-D or 2-D arrays only, got shape {arr.shape}")
    if n_chunks * chunk_rows < len(arr):
        raise ValueError(
            f"write_shard: {n_chunks} chunks of {chunk_rows} rows cannot hold {len(arr)} rows"
        )
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    row_bytes = data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
    chunk_bytes = chunk_rows * row_bytes
    flat = data.reshape(-1).view(np.uint8)  # (rows * row_bytes,)
    index = np.full((n_chunks, 2), EMPTY, dtype="<u8")
    pieces: list[memoryview] = []
    offset = 0
    for k in range(min(n_chunks, -(-len(data) // chunk_rows))):
        chunk = flat[k * chunk_bytes : (k + 1) * chunk_bytes]  # a view; short at the end
        if not chunk.any():
            continue  # all zero: the fill value, not stored
        if len(chunk) < chunk_bytes:  # the last chunk, padded with the fill value
            chunk = np.concatenate([chunk, np.zeros(chunk_bytes - len(chunk), np.uint8)])
        pieces.append(memoryview(chunk))
        index[k] = (offset, chunk_bytes)
        offset += chunk_bytes
    if not pieces:
        return None
    index_bytes = index.reshape(n_chunks, *([1] * (data.ndim - 1)), 2).tobytes()
    crc = google_crc32c.value(index_bytes).to_bytes(4, "little")
    pieces += [memoryview(index_bytes), memoryview(crc)]
    path = array_dir / shard_key(data.ndim)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for piece in pieces:
            fh.write(piece)
            digest.update(piece)
    size = offset + len(index_bytes) + len(crc)
    if os.path.getsize(path) != size:  # a full disk shows up here, not later
        raise OSError(f"{path}: wrote {os.path.getsize(path)} bytes, expected {size}")
    return WrittenShard(path=path, size=size, sha256=digest.hexdigest())
