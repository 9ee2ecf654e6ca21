"""cache/store.py: what says a unit or a cache is complete, and that it stays true. A re-run
that dies after finding a damaged unit, duplicate attempts of one unit (forced interleavings of
the real functions, nothing mocked), a hand-edited manifest or marker, a layout that differs.
Tiny random data in tmp_path."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache import (
    CacheError,
    CacheKey,
    CacheWriter,
    IncompleteCacheError,
    StorageLayout,
    UnitData,
    cache_info,
    open_cache,
    verify_cache,
)
from cache.store import unit_problems

D = 4
UNITS = [["a0", "a1"], ["b0"], ["c0", "c1"]]


def make_key(**changes) -> CacheKey:
    key = CacheKey("f" * 64, "mini_train", "tiny", "a" * 64, (28, 56), "last", '{"min_depth":1.0}')
    return dataclasses.replace(key, **changes)


def make_unit(tokens: list[str], seed: int, first: float | None = None) -> UnitData:
    """Random scans, every point paired; ``first`` replaces the first target value: two
    attempts of one unit whose bytes differ (another worker's threads, another GPU) but whose
    file sizes do not."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(3, 20)) for _ in tokens]
    target = [rng.normal(size=(n, D)).astype(np.float16) for n in sizes]
    if first is not None:
        target[0][0, 0] = first
    return UnitData(
        tokens=list(tokens),
        lidar_paths=[f"/data/{t}.bin" for t in tokens],
        points=[rng.normal(size=(n, 4)).astype(np.float32) for n in sizes],
        target=target,
        camera=[np.zeros(n, np.int8) for n in sizes],
        uv=[rng.uniform(0, 50, (n, 2)).astype(np.float32) for n in sizes],
        label=[rng.integers(0, 16, n).astype(np.uint8) for n in sizes],
    )


def write_cache(root: Path, finalize: bool = True) -> CacheWriter:
    writer = CacheWriter.create(root, make_key(), UNITS, D, {})
    with writer.lock():
        for u, tokens in enumerate(UNITS):
            writer.write_unit(u, make_unit(tokens, u))
        if finalize:
            writer.finalize({})
    return writer


def first_target(path: Path) -> float:
    return float(open_cache(path).read_scan(0).target[0, 0])


# ---------------------------------------------------------------- a re-run that dies ----
@pytest.mark.parametrize("step", ["pending_units", "write_unit"])
def test_a_rerun_that_dies_after_finding_a_damaged_unit_leaves_the_cache_incomplete(
    tmp_path: Path, step: str
) -> None:
    """A complete cache loses a unit's shard bytes; the re-run finds it (its driver's
    `pending_units`, or the unit's own `write_unit`), then dies before rewriting it: the cache
    no longer says it is complete, and `open_cache` refuses it naming the unit, instead of
    opening it and failing on the first read of that unit."""
    writer = write_cache(tmp_path)
    shard = writer.unit_dir(1) / "points" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-6])
    with writer.lock():
        if step == "pending_units":
            with pytest.warns(UserWarning, match="rewriting unit u00001"):
                assert writer.pending_units() == [1]
        else:  # the unit's task fails after it dropped the marker: bad data (feature dim 5)
            bad = make_unit(UNITS[1], 1)
            bad = dataclasses.replace(bad, target=[np.zeros((len(bad.points[0]), 5), np.float16)])
            with pytest.raises(ValueError):
                writer.write_unit(1, bad)
        # ... the run dies here
    assert not writer.is_finalized() and not cache_info(writer.path)["complete"]
    with pytest.raises(IncompleteCacheError, match=r"1 of 3 units missing \(u00001\)"):
        open_cache(writer.path)
    # the next re-run rewrites the unit and finalizes
    with writer.lock():
        assert writer.pending_units() == [1]
        assert writer.write_unit(1, make_unit(UNITS[1], 1)) > 0
        writer.finalize({})
    assert verify_cache(writer.path, progress=False) == []


# ---------------------------------------------------------------- duplicate attempts ----
def _attempt(root: Path, data: UnitData) -> CacheWriter:
    """Attempt of unit 0 written in a cache of its own (the same key and units): its folder is
    what the attempt renames into place, its marker what the attempt publishes afterwards."""
    other = CacheWriter.create(root, make_key(), UNITS, D, {})
    assert other.write_unit(0, data) > 0
    return other


def test_duplicate_attempt_never_replaces_the_unit_in_place(tmp_path: Path) -> None:
    """Two attempts of unit 0 (a Dask retry while the first still runs) whose bytes differ.
    Forced interleaving of the real steps: A renames its unit into place; B, past its entry
    check, writes its whole unit; A then publishes its marker. The unit in place stays A's and
    every marker describes it (before: B moved A's folder aside, and A's marker ended up over
    B's data with the same file sizes, so the quick check passed and `verify` failed)."""
    writer = write_cache(tmp_path / "cache", finalize=False)
    shutil.rmtree(writer.unit_dir(0))
    writer.marker_path(0).unlink()
    a = _attempt(tmp_path / "a", make_unit(UNITS[0], 0, first=1.0))
    # A: its rename into place (its marker is not published yet)
    a.unit_dir(0).rename(writer.unit_dir(0))
    # B: the whole write_unit, while A is between its rename and its marker
    assert writer.write_unit(0, make_unit(UNITS[0], 0, first=2.0)) == 0  # A's unit kept
    assert writer.is_complete(0)  # and published by B: A may die now, the unit is done
    assert not list((writer.path / "units").glob(".*"))  # B's temp dir is gone
    # A: publishes its marker last
    shutil.copy(a.marker_path(0), writer.marker_path(0))
    writer.finalize({})
    assert verify_cache(writer.path, progress=False) == []
    assert first_target(writer.path) == 1.0


def test_a_marker_that_is_not_the_units_record_is_not_complete(tmp_path: Path) -> None:
    """The quick check (sizes) cannot tell two attempts' markers apart; the record the unit
    folder carries can: another attempt's marker over this data is not complete, and a re-run
    rewrites the unit. A unit of older code (no record in its folder) is checked as before."""
    writer = write_cache(tmp_path / "cache")
    b = _attempt(tmp_path / "b", make_unit(UNITS[0], 0, first=2.0))
    good = writer.marker_path(0).read_bytes()
    shutil.copy(b.marker_path(0), writer.marker_path(0))  # B's marker over A's data
    problems = unit_problems(writer.path, 0, UNITS[0], checksums=False)
    assert problems == ["unit u00000: marker u00000.done is not the record of the data in u00000/ "
                        "(another attempt's marker?)"]  # fmt: skip
    assert not writer.is_complete(0)
    with pytest.warns(UserWarning, match="u00000: marker u00000.done is not the record"):
        assert writer.pending_units() == [0]
    assert writer.write_unit(0, make_unit(UNITS[0], 0)) > 0
    writer.finalize({})
    assert verify_cache(writer.path, progress=False) == []
    # Older code's units carry no record: their marker alone says what is there.
    writer.marker_path(0).write_bytes(good)
    for u in range(len(UNITS)):
        shutil.rmtree(writer.unit_dir(u) / "done", ignore_errors=True)
    assert all(writer.is_complete(u) for u in range(len(UNITS)))
    assert writer.pending_units() == [] and writer.write_unit(0, make_unit(UNITS[0], 0)) == 0
    assert verify_cache(writer.path, progress=False) == []


# ---------------------------------------------------------------- verify ----
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("split", "digest '{digest}', but its key's digest is"),
        ("min_depth", "digest '{digest}', but its key's digest is"),
        ("key and digest", "folder '{digest}' is not named after its digest"),
        ("folder", "folder 'renamed' is not named after its digest '{digest}'"),
    ],
)
def test_verify_checks_the_manifest_key_digest_and_folder(
    tmp_path: Path, edit: str, message: str
) -> None:
    """A copy whose manifest key was edited (its targets are not what the key says) or whose
    folder was renamed is not "ok"."""
    writer = write_cache(tmp_path / "root")
    digest = writer.path.name
    copy = tmp_path / ("renamed" if edit == "folder" else digest)
    shutil.copytree(writer.path, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if edit in ("split", "key and digest"):
        manifest["key"]["split"] = "mini_val"
    elif edit == "min_depth":
        manifest["key"]["pairing"] = '{"min_depth":2.0}'
    if edit == "key and digest":
        manifest["digest"] = CacheKey.from_dict(manifest["key"]).digest()
    manifest_path.write_text(json.dumps(manifest))
    problems = verify_cache(copy, progress=False)
    assert len(problems) == 1 and message.format(digest=digest) in problems[0], problems
    assert verify_cache(writer.path, progress=False) == []


def test_a_marker_entry_without_checksum_is_a_problem(tmp_path: Path) -> None:
    writer = write_cache(tmp_path)
    m = json.loads(writer.marker_path(2).read_text())
    del m["files"]["label/c/0"]["crc32c"]
    writer.marker_path(2).write_text(json.dumps(m))
    expected = "unit u00002: marker u00002.done records no size and crc32c (or sha256) for file"
    problems = verify_cache(writer.path, progress=False)
    assert problems == [f"{expected} label/c/0"]
    assert not writer.is_complete(2)


# ---------------------------------------------------------------- layout ----
def test_a_rerun_with_another_layout_is_refused_none_keeps_the_caches(tmp_path: Path) -> None:
    zstd = StorageLayout(chunk_rows=64, target_codec="zstd")
    first = CacheWriter.create(tmp_path, make_key(), UNITS, D, {}, layout=zstd)
    assert CacheWriter.create(tmp_path, make_key(), UNITS, D, {}, layout=zstd).layout == zstd
    assert CacheWriter.create(tmp_path, make_key(), UNITS, D, {}).layout == zstd
    with pytest.raises(CacheError, match=rf"{first.path} already exists with a different 'layout'"):
        CacheWriter.create(tmp_path, make_key(), UNITS, D, {}, layout=StorageLayout())


# ---------------------------------------------------------------- the zarr read path ----
def test_zarr_path_names_the_file_of_a_damaged_shard_index(tmp_path: Path) -> None:
    """`open_cache(fast_path=False)` reads through zarr, whose error for a damaged shard index
    ("Stored and computed checksum do not match") names no file: a CacheError names it."""
    writer = write_cache(tmp_path)
    shard = writer.unit_dir(0) / "target" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x80  # the index's crc32c
    shard.write_bytes(bytes(raw))
    reader = open_cache(writer.path, fast_path=False)
    with pytest.raises(CacheError, match=re.escape(str(shard)) + ".*checksum"):
        reader.read_scan(0)
    assert reader.read_scan(2).token == "b0"  # other units read
