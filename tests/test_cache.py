"""cache/: key, atomic unit writer, reader, verify, lock, CLI. Tiny random data in tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, TransposeCodec, ZstdCodec

from cache import (
    DEFAULT_LAYOUT,
    SCHEMA_VERSION,
    CacheError,
    CacheKey,
    CacheKeyMismatch,
    CacheWriter,
    IncompleteCacheError,
    LockHeldError,
    SchemaVersionError,
    StorageLayout,
    UnitData,
    cache_lock,
    dataset_fingerprint,
    open_cache,
    resolve_cache,
    verify_cache,
)
from cache.schema import LOCK_FILE, ScanTargets, quantize_rows
from cache.shardread import ShardArray
from cache.store import write_unit_group

D = 8  # feature dim of the tiny caches
UNITS = [["s0", "s1", "s2"], ["s3", "s4"], ["s5"], ["s6", "s7"]]


def make_key(**changes) -> CacheKey:
    key = CacheKey(
        dataset_fingerprint="f" * 64,
        split="mini_train",
        teacher="tiny-dinov2",
        teacher_weights_sha256="a" * 64,
        image_size=(224, 448),
        feature_layer="last",
        pairing='{"min_depth":1.0}',
    )
    return dataclasses.replace(key, **changes)


def make_unit(tokens: list[str], seed: int) -> UnitData:
    """Random scans; scan "s2" has no points, scan "s5" no paired point. Unpaired target rows
    are NOT zero: the cache must drop them."""
    rng = np.random.default_rng(seed)
    sizes = [0 if t == "s2" else int(rng.integers(5, 60)) for t in tokens]
    camera = [rng.integers(-1, 6, n).astype(np.int8) for n in sizes]
    camera = [np.full_like(c, -1) if t == "s5" else c for c, t in zip(camera, tokens, strict=True)]
    return UnitData(
        tokens=list(tokens),
        lidar_paths=[f"/data/samples/LIDAR_TOP/{t}.pcd.bin" for t in tokens],
        points=[rng.normal(size=(n, 4)).astype(np.float32) for n in sizes],
        target=[rng.normal(size=(n, D)).astype(np.float16) for n in sizes],
        camera=camera,
        uv=[rng.uniform(0, 1600, (n, 2)).astype(np.float32) for n in sizes],
        label=[rng.integers(0, 17, n).astype(np.uint8) for n in sizes],
    )


def unit_data() -> list[UnitData]:
    return [make_unit(tokens, seed) for seed, tokens in enumerate(UNITS)]


def write_cache(
    root: Path,
    key: CacheKey | None = None,
    finalize: bool = True,
    layout: StorageLayout = DEFAULT_LAYOUT,
) -> CacheWriter:
    writer = CacheWriter.create(root, key or make_key(), UNITS, D, {"config": {"seed": 0}}, layout)
    with writer.lock():
        for u, data in enumerate(unit_data()):
            writer.write_unit(u, data)
        if finalize:
            writer.finalize({"note": "test"})
    return writer


def marker(writer: CacheWriter, unit: int) -> dict:
    return json.loads(writer.marker_path(unit).read_text())


def tree_digest(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def refresh_marker(writer: CacheWriter, unit: int) -> None:
    """Re-record sizes/checksums of a unit's files, so only the structural checks can notice."""
    from cache.shardwrite import file_checksum

    m = marker(writer, unit)
    for rel in tree_digest(writer.unit_dir(unit)):
        p = writer.unit_dir(unit) / rel
        m["files"][rel] = {"size": p.stat().st_size, "crc32c": file_checksum(p)}
    writer.marker_path(unit).write_text(json.dumps(m))


# ---------------------------------------------------------------- round trip ----
def test_round_trip_is_exact(tmp_path: Path) -> None:
    writer = write_cache(tmp_path)
    reader = open_cache(writer.path)
    assert len(reader) == 8 and reader.tokens == [t for u in UNITS for t in u]
    assert reader.key == make_key() and reader.feature_dim == D
    assert reader.meta == {"config": {"seed": 0}}
    expected = {t: (d, j) for d in unit_data() for j, t in enumerate(d.tokens)}
    for i, token in enumerate(reader.tokens):
        s = reader.read_scan(i)
        d, j = expected[token]
        paired = d.camera[j] != -1
        assert s.token == token and s.lidar_path == d.lidar_paths[j]
        assert reader.num_points(i) == len(d.points[j])
        for name in ("points", "camera", "uv", "label"):
            got, want = getattr(s, name), getattr(d, name)[j]
            assert got.dtype == want.dtype and np.array_equal(got, want), (token, name)
        assert s.target.dtype == np.float16 and s.target.shape == (len(paired), D)
        assert np.array_equal(s.target[paired], d.target[j][paired])
        assert not s.target[~paired].any()  # unpaired rows come back as zeros
    assert reader.read_scan(2).points.shape == (0, 4)  # the empty scan
    with pytest.raises(IndexError, match="8 scans"):
        reader.read_scan(8)
    info = reader.info()
    assert info["complete"] and info["scans"] == 8 and info["units_done"] == 4
    assert info["points"] == sum(len(p) for d in unit_data() for p in d.points)
    paired = sum(int((c != -1).sum()) for d in unit_data() for c in d.camera)
    assert info["paired_share"] == pytest.approx(paired / info["points"])
    assert info["bytes_on_disk"] > 0
    assert reader.verify(progress=False) == []


def _read_all(reader) -> list[str]:
    return [hashlib.sha256(reader.read_scan(i).target.tobytes()).hexdigest() for i in range(8)]


def test_reader_pickles_and_works_in_forked_workers(tmp_path: Path) -> None:
    reader = open_cache(write_cache(tmp_path).path)
    expected = _read_all(reader)  # opens units in the parent first, as a DataLoader would
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._open == {} and _read_all(clone) == expected
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_read_all, [reader, reader]) == [expected, expected]


def test_reader_keeps_a_bounded_number_of_units_open(tmp_path: Path, monkeypatch) -> None:
    """Reading every scan of a cache keeps at most MAX_OPEN_UNITS units open (the least recently
    used go first), not one per unit read: a DataLoader worker reads every unit of a cache of
    thousands. Units dropped are reopened on their next read, with the same data."""
    import cache.reader

    monkeypatch.setattr(cache.reader, "MAX_OPEN_UNITS", 2, raising=False)
    reader = open_cache(write_cache(tmp_path).path)
    expected = _read_all(open_cache(reader.path))
    held = []
    for _ in range(2):
        for i in range(len(reader)):
            reader.read_scan(i)
            held.append(len(reader._open))
    assert max(held) == 2
    assert list(reader._open) == [2, 3]  # the last two units read, the latest last
    reader.read_scan(5)  # unit 2 again: now the most recently used
    assert list(reader._open) == [3, 2]
    assert _read_all(reader) == expected


def test_write_unit_rejects_bad_data(tmp_path: Path) -> None:
    writer = CacheWriter.create(tmp_path, make_key(), UNITS, D, {})
    data = make_unit(UNITS[0], 0)
    data.target[1] = data.target[1].astype(np.float32)
    with pytest.raises(ValueError, match=r"scan s1: 'target' must be float16"):
        writer.write_unit(0, data)
    data = make_unit(UNITS[0], 0)
    data.uv[0] = data.uv[0][:-1]
    with pytest.raises(ValueError, match=r"scan s0: 'uv' has shape"):
        writer.write_unit(0, data)
    with pytest.raises(ValueError, match="tokens differ from the manifest"):
        writer.write_unit(1, make_unit(UNITS[0], 0))
    assert writer.pending_units() == [0, 1, 2, 3]
    assert not list((writer.path / "units").iterdir())  # nothing half-written left behind


def test_paired_target_rows_write_the_same_unit_as_full_target(tmp_path: Path) -> None:
    """UnitData.paired_target (what extraction hands over) stores exactly what target does; for
    point-i8 also when the caller quantized the rows (with paired_target_scale)."""
    full, paired = (CacheWriter.create(tmp_path / n, make_key(), UNITS, D, {}) for n in "ab")
    for u, data in enumerate(unit_data()):
        full.write_unit(u, data)
        rows = [t[c != -1] for t, c in zip(data.target, data.camera, strict=True)]
        paired.write_unit(u, dataclasses.replace(data, target=None, paired_target=rows))
    for u in range(len(UNITS)):
        a, b = (json.loads(w.marker_path(u).read_text()) for w in (full, paired))
        assert a["files"] == b["files"] and a["arrays"] == b["arrays"]  # sizes and checksums
    # point-i8: rows quantized by the caller (extraction does it on the GPU) = quantized here
    key = make_key(target_format="point-i8", schema_version=None)
    full, quant = (CacheWriter.create(tmp_path / n, key, UNITS, D, {}) for n in ("i8a", "i8b"))
    for u, unit in enumerate(unit_data()):
        full.write_unit(u, unit)
        rows = [quantize_rows(t[c != -1]) for t, c in zip(unit.target, unit.camera, strict=True)]
        quant.write_unit(
            u,
            dataclasses.replace(
                unit,
                target=None,
                paired_target=[q for q, _ in rows],
                paired_target_scale=[scale for _, scale in rows],
            ),
        )
        a, b = (json.loads(w.marker_path(u).read_text()) for w in (full, quant))
        assert a["files"] == b["files"]
    data = make_unit(UNITS[0], 0)
    rows = [t[c != -1] for t, c in zip(data.target, data.camera, strict=True)]
    rows[1] = rows[1][:-1]
    fresh = CacheWriter.create(tmp_path / "c", make_key(), UNITS, D, {})
    with pytest.raises(ValueError, match=r"scan s1: 'paired_target' must be float16"):
        fresh.write_unit(0, dataclasses.replace(data, target=None, paired_target=rows))


def test_create_is_idempotent_and_checks_the_manifest(tmp_path: Path) -> None:
    a = CacheWriter.create(tmp_path, make_key(), UNITS, D, {"run": 1})
    manifest = (a.path / "manifest.json").read_bytes()
    b = CacheWriter.create(tmp_path, make_key(), UNITS, D, {"run": 2})
    assert b.path == a.path and (a.path / "manifest.json").read_bytes() == manifest
    assert b.layout == DEFAULT_LAYOUT  # a resumed cache keeps the layout it was started with
    with pytest.raises(CacheError, match="different 'layout'.*zstd"):
        CacheWriter.create(
            tmp_path, make_key(), UNITS, D, {}, layout=StorageLayout(target_codec="zstd")
        )
    with pytest.raises(CacheError, match="different 'units'"):
        CacheWriter.create(tmp_path, make_key(), [["s0"], ["s1"]], D, {})
    tokens = [t for unit in UNITS for t in unit]
    with pytest.raises(CacheError, match="units of 1/2/3 scans, this run asks for units of 1 scans.*"
                       "--scans-per-unit"):  # fmt: skip
        CacheWriter.create(tmp_path, make_key(), [[t] for t in tokens], D, {})
    with pytest.raises(CacheError, match="different 'feature_dim'"):
        CacheWriter.create(tmp_path, make_key(), UNITS, D + 1, {})
    with pytest.raises(ValueError, match="repeated"):
        CacheWriter.create(tmp_path, make_key(), [["s0"], ["s0"]], D, {})


# ---------------------------------------------------------------- key ----
KEY_CHANGES = {
    "dataset_fingerprint": "e" * 64,
    "split": "mini_val",
    "teacher": "facebook/dinov2-base",
    "teacher_weights_sha256": "b" * 64,
    "image_size": (224, 224),
    "feature_layer": "penultimate",
    "pairing": '{"min_depth":2.0}',
    "teacher_dtype": "bfloat16",
    "teacher_weights_dtype": "float16",
    "teacher_config_sha256": "c" * 64,
    "image_decode": "device",
    "target_format": "point-i8",
    "schema_version": SCHEMA_VERSION + 1,
}


def test_key_digest_changes_with_every_field_and_old_cache_stays(tmp_path: Path) -> None:
    assert set(KEY_CHANGES) == {f.name for f in dataclasses.fields(CacheKey)}
    base = make_key()
    assert base.digest() == make_key().digest() and len(base.digest()) == 16
    assert CacheKey.from_dict(json.loads(json.dumps(base.to_dict()))) == base
    old = write_cache(tmp_path, base)
    before = tree_digest(old.path)
    digests = {base.digest()}
    for name, value in KEY_CHANGES.items():
        if name == "target_format":  # a new format needs schema version 2: both fields differ
            other = dataclasses.replace(base, target_format=value, schema_version=None)
            changed = ["target_format", "schema_version"]
        else:
            other, changed = dataclasses.replace(base, **{name: value}), [name]
        assert other.mismatches(base) == changed and base.mismatches(other) == changed
        digests.add(other.digest())
    assert len(digests) == len(KEY_CHANGES) + 1
    new = write_cache(tmp_path, dataclasses.replace(base, teacher="facebook/dinov2-base"))
    assert new.path != old.path and tree_digest(old.path) == before  # old cache untouched
    assert open_cache(old.path).key == base
    # Fields added later are left out of the digest at their old meaning: keys written before
    # them (no such entry in the manifest) keep their digest and their cache.
    left_out = {"teacher_config_sha256", "image_decode", "target_format", "teacher_weights_dtype"}
    assert not left_out & set(base.to_dict())


def test_dataset_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    a = tmp_path / "a" / "v1.0-mini"
    a.mkdir(parents=True)
    (a / "sample.json").write_text('[{"token": "x"}]')
    (a / "scene.json").write_text("[]")
    fp = dataset_fingerprint([a / "sample.json", a / "scene.json"])
    b = tmp_path / "moved" / "v1.0-mini"
    shutil.copytree(a, b)
    assert dataset_fingerprint([b / "scene.json", b / "sample.json"]) == fp
    (b / "scene.json").write_text('[{"token": "y"}]')
    assert dataset_fingerprint([b / "sample.json", b / "scene.json"]) != fp
    with pytest.raises(FileNotFoundError, match="missing.json"):
        dataset_fingerprint([a / "missing.json"])


def test_resolve_cache_root_or_path(tmp_path: Path) -> None:
    first = write_cache(tmp_path)
    assert resolve_cache(tmp_path) == first.path
    assert resolve_cache(first.path, make_key()) == first.path
    second_key = make_key(image_size=(448, 896))
    write_cache(tmp_path, second_key, finalize=False)
    with pytest.raises(CacheError, match="holds 2 caches") as error:
        resolve_cache(tmp_path)
    for digest, size in ((first.path.name, "224x448"), (second_key.digest(), "448x896")):
        assert f"{digest}: split mini_train, teacher tiny-dinov2 (aaaaaaaa), {size}, point-f16" in (
            str(error.value)
        )
    assert resolve_cache(tmp_path, second_key) == tmp_path / second_key.digest()
    with pytest.raises(CacheKeyMismatch, match=r"differs in split, image_size"):
        resolve_cache(tmp_path, make_key(split="mini_val", image_size=(448, 448)))
    with pytest.raises(CacheKeyMismatch, match="teacher differ"):
        resolve_cache(first.path, make_key(teacher="other"))


# ---------------------------------------------------------------- parallel writers ----
@pytest.mark.timeout(120)
def test_parallel_dask_writers_equal_serial_writer(tmp_path: Path) -> None:
    from dask.distributed import Client, LocalCluster

    serial = write_cache(tmp_path / "serial")
    parallel = CacheWriter.create(tmp_path / "parallel", make_key(), UNITS, D, {"config": {}})
    data = unit_data()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
        parallel.lock(),
    ):
        workers = sorted(client.scheduler_info()["workers"])
        futures = [
            client.submit(parallel.write_unit, u, data[u], workers=[workers[u % 2]], pure=False)
            for u in parallel.pending_units()
        ]
        written = client.gather(futures)
        parallel.finalize({})
    assert all(b > 0 for b in written)
    pids = {marker(parallel, u)["pid"] for u in range(len(UNITS))}
    assert len(pids) == 2 and os.getpid() not in pids  # really two other processes
    for u in range(len(UNITS)):
        assert marker(parallel, u)["arrays"] == marker(serial, u)["arrays"]
        assert tree_digest(parallel.unit_dir(u)) == tree_digest(serial.unit_dir(u))
    assert verify_cache(parallel.path, progress=False) == []


# ---------------------------------------------------------------- crashes and resume ----
def test_killed_writer_leftovers_are_not_complete_and_are_cleaned(tmp_path: Path) -> None:
    done = write_cache(tmp_path / "done")
    writer = CacheWriter.create(tmp_path, make_key(), UNITS, D, {})
    units = writer.path / "units"
    # A writer killed mid-write of unit 0 leaves a temp dir (here: a truncated copy)...
    tmp = units / ".u00000.tmp-0123456789abcdef"
    shutil.copytree(done.unit_dir(0), tmp)
    shard = tmp / "target" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:10])
    # ...one killed between rename and marker leaves a unit folder without marker.
    shutil.copytree(done.unit_dir(1), units / "u00001")
    writer.write_unit(2, unit_data()[2])
    assert [writer.is_complete(u) for u in range(4)] == [False, False, True, False]
    assert writer.pending_units() == [0, 1, 3]
    with pytest.raises(
        IncompleteCacheError, match=r"3 of 4 units not done \(u00000, u00001, u00003\)"
    ):
        writer.finalize({})
    with pytest.raises(IncompleteCacheError, match="3 of 4 units missing"):
        open_cache(writer.path)
    # Re-run: taking the lock removes the temp dir; only pending units are written.
    with writer.lock():
        assert not tmp.exists()
        for u in writer.pending_units():
            assert writer.write_unit(u, unit_data()[u]) > 0
        assert writer.write_unit(2, unit_data()[2]) == 0  # done: skipped
        writer.finalize({})
    assert not list(units.glob(".*"))
    assert verify_cache(writer.path, progress=False) == []
    for u in range(4):
        assert marker(writer, u)["arrays"] == marker(done, u)["arrays"]


KILLED_WRITER = """
import json, sys
import numpy as np
from cache import CacheKey, CacheWriter, UnitData
n, d = 400_000, 64  # big enough that the write takes a while after the temp dir appears
key = CacheKey.from_dict(json.loads(sys.argv[2]))
writer = CacheWriter.create(sys.argv[1], key, [["big"]], d, {})
rng = np.random.default_rng(0)
data = UnitData(["big"], ["/x.bin"], [rng.normal(size=(n, 4)).astype(np.float32)],
                [rng.normal(size=(n, d)).astype(np.float16)], [np.zeros(n, np.int8)],
                [np.zeros((n, 2), np.float32)], [np.zeros(n, np.uint8)])
print("ready", flush=True)
writer.write_unit(0, data)
"""


@pytest.mark.timeout(60)
def test_really_killed_writer_leaves_nothing_complete(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), json.dumps(make_key().to_dict())],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"ready\n"
    units = tmp_path / make_key().digest() / "units"
    deadline = time.monotonic() + 30
    while not list(units.glob(".u00000.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.kill()  # SIGKILL in the middle of the unit
    proc.wait()
    assert list(units.glob(".u00000.tmp-*")), "the writer finished before it could be killed"
    writer = CacheWriter.create(tmp_path, make_key(), [["big"]], 64, {})
    assert not writer.is_complete(0) and writer.pending_units() == [0]
    with pytest.raises(IncompleteCacheError, match="1 of 1 units missing"):
        open_cache(writer.path)
    with writer.lock():  # the re-run's lock removes the leftovers
        assert not list(units.glob(".*"))


def test_flipped_byte_is_detected_and_unit_rewritten(tmp_path: Path) -> None:
    writer = write_cache(tmp_path)
    shard = writer.unit_dir(1) / "target" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    problems = verify_cache(writer.path, progress=False)
    assert problems == ["unit u00001: file target/c/0/0 checksum mismatch (corrupted)"]
    assert writer.pending_units() == []  # sizes unchanged: the quick check cannot see it
    with pytest.warns(UserWarning, match="u00001.*checksum"):
        assert writer.pending_units(verify_checksums=True) == [1]
    assert writer.write_unit(1, unit_data()[1]) > 0
    writer.finalize({})  # the rewrite removed COMPLETE: the re-run finalizes again
    assert verify_cache(writer.path, progress=False) == []


def test_markers_with_sha256_still_verify(tmp_path: Path) -> None:
    """Markers written before crc32c (2026-11-26) record sha256 per file: a cache of them
    verifies, and a flipped byte is still found."""
    writer = write_cache(tmp_path)
    for unit in range(len(UNITS)):
        m = marker(writer, unit)
        m["files"] = {
            rel: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
            for rel, b in ((rel, (writer.unit_dir(unit) / rel).read_bytes()) for rel in m["files"])
        }
        writer.marker_path(unit).write_text(json.dumps(m))
    assert verify_cache(writer.path, progress=False) == []
    shard = writer.unit_dir(2) / "uv" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0x10
    shard.write_bytes(bytes(raw))
    problems = verify_cache(writer.path, progress=False)
    assert problems == ["unit u00002: file uv/c/0/0 checksum mismatch (corrupted)"]


def test_truncated_shard_missing_marker_and_missing_unit_are_detected(tmp_path: Path) -> None:
    writer = write_cache(tmp_path)
    shard = writer.unit_dir(0) / "points" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-7])
    writer.marker_path(2).unlink()
    shutil.rmtree(writer.unit_dir(3))
    problems = verify_cache(writer.path, progress=False)
    assert len(problems) == 3, problems
    assert (
        problems[0].startswith("unit u00000: file points/c/0/0 has") and "truncated" in problems[0]
    )
    assert problems[1] == "unit u00002: not done (no marker u00002.done)"
    assert problems[2].startswith("unit u00003: marker present but folder")
    with pytest.warns(UserWarning) as warned:
        assert writer.pending_units() == [0, 2, 3]
    assert sorted(str(w.message).split(":")[0] for w in warned) == [
        "rewriting unit u00000",
        "rewriting unit u00003",
    ]


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("offsets_not_monotonic", "unit u00001: offsets not monotonic from 0"),
        ("offsets_last", "unit u00001: last of offsets is"),
        ("label_rows", "unit u00001: per-point arrays have different row counts"),
        ("target_offsets", "unit u00001: target_offsets disagree with the paired points"),
    ],
)
def test_inconsistent_arrays_are_detected(tmp_path: Path, corruption: str, message: str) -> None:
    writer = write_cache(tmp_path)
    group = zarr.open_group(zarr.storage.LocalStore(writer.unit_dir(1)), mode="r+")
    if corruption == "offsets_not_monotonic":
        group["offsets"][1] = group["offsets"][2] + 1
    elif corruption == "offsets_last":
        group["offsets"][-1] = group["offsets"][-1] - 1
    elif corruption == "label_rows":
        label = group["label"][:]
        group.create_array("label", data=label[:-1], chunks=(4,), overwrite=True)
    else:
        t = group["target_offsets"][:]
        t[1:-1] = t[-1]  # same total, wrong split between the scans
        group["target_offsets"][:] = t
    refresh_marker(writer, 1)  # checksums match again: the structure must be checked
    problems = verify_cache(writer.path, progress=False)
    assert any(p.startswith(message) for p in problems), problems
    assert all(p.startswith("unit u00001") for p in problems)


# ---------------------------------------------------------------- refusing to open ----
def test_open_cache_refuses_incomplete_and_other_schema(tmp_path: Path) -> None:
    writer = CacheWriter.create(tmp_path, make_key(), UNITS, D, {})
    writer.write_unit(0, unit_data()[0])
    writer.write_unit(2, unit_data()[2])
    with pytest.raises(IncompleteCacheError) as e:
        open_cache(writer.path)
    assert "2 of 4 units missing (u00001, u00003)" in str(e.value)
    assert "extract-teacher" in str(e.value)
    for u in (1, 3):
        writer.write_unit(u, unit_data()[u])
    with pytest.raises(IncompleteCacheError, match="all units done, not finalized"):
        open_cache(writer.path)
    assert not writer.is_finalized()
    writer.finalize({})
    assert writer.is_finalized()
    manifest_path = writer.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError) as e:
        open_cache(writer.path)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(e.value)
    assert f"reads version {SCHEMA_VERSION}" in str(e.value) and "update this code" in str(e.value)
    with pytest.raises(CacheError, match="not a cache: no manifest.json"):
        open_cache(tmp_path)


def test_a_manifest_edited_by_hand_is_refused_naming_the_field(tmp_path: Path) -> None:
    """Every reader of a manifest uses feature_dim, digest, layout and units: a value of the
    wrong kind is refused naming the file and the field (not a TypeError far away); a manifest
    that cannot be read, or a cache root that is no folder, is named as such."""
    from cache.store import list_caches, load_manifest

    writer = write_cache(tmp_path / "root")
    path = writer.path / "manifest.json"
    good = json.loads(path.read_text())
    assert load_manifest(writer.path) == good and good["feature_dim"] == D
    cases = [
        ({"feature_dim": 0}, "feature_dim must be a positive integer, got 0"),
        ({"feature_dim": True}, "feature_dim must be a positive integer, got true"),
        ({"feature_dim": "16"}, 'feature_dim must be a positive integer, got "16"'),
        ({"digest": 7}, "digest must be a string, got 7"),
        ({"layout": []}, "layout must be an object, got []"),
        ({"units": [["a"], [2]]}, 'units must be a list of lists of scan tokens, got [["a"], [2]]'),
        ({"units": ["a", "b"]}, 'units must be a list of lists of scan tokens, got ["a", "b"]'),
    ]
    for change, problem in cases:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(CacheError) as e:
            load_manifest(writer.path)
        assert str(e.value) == f"cache manifest {path}: {problem} (edited by hand?)", change
    path.unlink()
    path.mkdir()  # a folder where the file belongs
    with pytest.raises(CacheError) as e:
        load_manifest(writer.path)
    assert str(e.value) == f"cache manifest {path} cannot be read: Is a directory"
    gone = tmp_path / "gone"
    gone.symlink_to(tmp_path / "nowhere")
    with pytest.raises(CacheError) as e:
        list_caches(gone)
    assert str(e.value) == f"cache root {gone} is a broken symlink (to {tmp_path / 'nowhere'})"
    with pytest.raises(CacheError, match=f"^cache root {tmp_path / 'nowhere'} does not exist$"):
        list_caches(tmp_path / "nowhere")


# ---------------------------------------------------------------- lock ----
def test_lock_excludes_a_second_writer(tmp_path: Path) -> None:
    with cache_lock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()} on host"):
            with cache_lock(tmp_path):
                pass
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from cache import cache_lock\n"
                f"with cache_lock({str(tmp_path)!r}): pass",
            ],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        assert other.returncode != 0 and "LockHeldError" in other.stderr
    assert not (tmp_path / LOCK_FILE).exists()
    with cache_lock(tmp_path):  # released: can be taken again
        pass


def test_stale_lock_is_taken_over_live_foreign_lock_is_not(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "id": "x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match=f"stale lock.*pid {dead.pid}"):
        with cache_lock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    # Our own pid with a start time before this process began: the pid was reused → stale.
    reused = {"pid": os.getpid(), "host": socket.gethostname(), "started": 1.0, "id": "y"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(reused))
    with pytest.warns(UserWarning, match="stale lock"), cache_lock(tmp_path):
        pass
    foreign = {"pid": 1, "host": "another-host", "started": time.time(), "id": "z"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign))
    with pytest.raises(LockHeldError, match="host another-host"):
        with cache_lock(tmp_path):
            pass


# ---------------------------------------------------------------- CLI ----
def test_cli_info_and_verify(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    writer = write_cache(tmp_path)
    result = runner.invoke(cli.app, ["cache", "info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert writer.path.name in result.output and "complete   yes" in result.output
    assert "scans      8/8" in result.output
    result = runner.invoke(cli.app, ["cache", "verify", str(writer.path)])
    assert result.exit_code == 0 and "ok" in result.output
    write_cache(tmp_path, make_key(split="mini_val"), finalize=False)
    result = runner.invoke(cli.app, ["cache", "info", str(tmp_path)])
    assert result.exit_code == 0 and "2 caches under" in result.output
    assert "mini_val" in result.output and "4/4 units" in result.output
    (writer.unit_dir(2) / "label" / "c" / "0").write_bytes(b"garbage")
    result = runner.invoke(cli.app, ["cache", "verify", str(writer.path)])
    assert result.exit_code == 1 and "unit u00002: file label/c/0" in result.output


def test_verify_reads_the_completion_marker(tmp_path: Path) -> None:
    """COMPLETE is finalize's record (the run's summary, the unit count): verify names a marker
    that is not JSON or counts other units, not only a missing one."""
    writer = write_cache(tmp_path)
    marker = writer.path / "COMPLETE"
    assert verify_cache(writer.path, progress=False) == []
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "units": record["units"] + 1}))
    (problem,) = verify_cache(writer.path, progress=False)
    assert (
        f"completion marker {marker}: counts {record['units'] + 1} units, the manifest 4" in problem
    )
    marker.write_bytes(b'{"summary": {"sc')  # torn
    (problem,) = verify_cache(writer.path, progress=False)
    assert f"completion marker {marker} is not valid JSON" in problem


def _race(args: tuple[str, object]) -> bool:
    """Wait at the barrier, then create the cache and try to take its lock; True if taken."""
    root, barrier = args
    barrier.wait()
    writer = CacheWriter.create(root, make_key(), UNITS, D, {"pid": os.getpid()})
    try:
        with writer.lock():
            time.sleep(1.5)  # hold it while the others try
            return True
    except LockHeldError:
        return False


def test_racing_runs_one_manifest_one_lock_holder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            taken = pool.map(_race, [(str(tmp_path), barrier)] * 4)
    assert sorted(taken) == [False, False, False, True]
    manifest = json.loads((tmp_path / make_key().digest() / "manifest.json").read_text())
    assert manifest["units"] == UNITS and "pid" in manifest["meta"]
    assert sorted(p.name for p in (tmp_path / make_key().digest()).iterdir()) == [
        "manifest.json",
        "units",
    ]


# ---------------------------------------------------------------- direct shard reads ----
def _border_and_random_ranges(rows: int, chunk: int, rng: np.random.Generator) -> list[tuple]:
    """Row ranges [s, e) of an array: empty ones, every pair of inner-chunk borders (and their
    neighbours, so ranges start/end on, before and after a border), the padded last chunk, and
    random ones."""
    points = {0, 1, rows - 1, rows}
    for b in range(0, rows + 1, chunk):
        points |= {b - 1, b, b + 1}
    points = sorted(p for p in points if 0 <= p <= rows)
    ranges = [(s, e) for s in points for e in points if s <= e]
    for _ in range(200):
        s, e = sorted(int(x) for x in rng.integers(0, rows + 1, 2))
        ranges.append((s, e))
    return ranges


def _assert_same_rows(fast: ShardArray, array: zarr.Array, rng: np.random.Generator) -> None:
    for s, e in _border_and_random_ranges(array.shape[0], fast.chunk_rows, rng):
        got, want = fast.read(s, e), array[s:e]
        assert got.dtype == want.dtype and got.shape == want.shape, (fast.shard, s, e)
        assert got.tobytes() == want.tobytes(), (fast.shard, s, e)


def test_shard_reads_equal_zarr_on_random_ranges(tmp_path: Path) -> None:
    """Every array write_unit_group makes (1-D and 2-D, all dtypes) read directly equals zarr's
    ``array[s:e]``: ranges across inner-chunk borders, empty ranges, the padded last chunk, and
    inner chunks the writer left out of the shard (all fill value)."""
    rng = np.random.default_rng(7)
    tokens = ["a", "b", "c", "d"]
    data = make_unit(tokens, seed=3)
    sizes = [0, 37, 100, 61]  # 198 rows: 13 inner chunks of 16 rows, the last padded by 10
    for name in ("points", "target", "uv"):
        getattr(data, name)[:] = [
            rng.normal(size=(n, a.shape[1])).astype(a.dtype)
            for n, a in zip(sizes, getattr(data, name), strict=True)
        ]
    data.camera[:] = [rng.integers(-1, 6, n).astype(np.int8) for n in sizes]
    data.label[:] = [rng.integers(1, 17, n).astype(np.uint8) for n in sizes]
    data.label[2][:60] = 0  # fill value: whole inner chunks of zeros are not stored
    write_unit_group(tmp_path / "g", data, D, StorageLayout(chunk_rows=16))
    for name in ("points", "target", "camera", "uv", "label"):
        fast = ShardArray.open(tmp_path / "g" / name)
        assert fast is not None, name
        array = zarr.open_array(zarr.storage.LocalStore(tmp_path / "g" / name), mode="r")
        assert len(fast.chunk_offsets) * fast.chunk_rows > array.shape[0] > fast.chunk_rows
        _assert_same_rows(fast, array, rng)
    assert -1 in ShardArray.open(tmp_path / "g" / "label").chunk_offsets  # an absent chunk

    # index at the start of the shard (allowed by the spec, not what our writer does)
    store = zarr.storage.LocalStore(tmp_path / "other")
    values = rng.normal(size=(100, 3)).astype(np.float32)
    start = zarr.create_array(
        store, name="start", shape=values.shape, dtype=values.dtype, chunks=(102, 3),
        serializer=ShardingCodec(chunk_shape=(34, 3), index_location="start"),
        compressors=None, fill_value=0,
    )  # fmt: skip
    start[:] = values
    fast = ShardArray.open(tmp_path / "other" / "start")
    assert fast is not None and not fast.index_at_end
    _assert_same_rows(fast, start, rng)

    # all fill value: zarr writes no shard file at all
    zeros = zarr.create_array(
        store, name="zeros", data=np.zeros(50, np.uint8), chunks=(10,), shards=(50,),
        compressors=(), fill_value=0,
    )  # fmt: skip
    assert not (tmp_path / "other" / "zeros" / "c").exists()
    _assert_same_rows(ShardArray.open(tmp_path / "other" / "zeros", missing_ok=True), zeros, rng)
    with pytest.raises(CacheError, match=r"shard file .*zeros/c/0 missing"):
        ShardArray.open(tmp_path / "other" / "zeros")


@pytest.mark.parametrize(
    "layout",
    ["zstd", "blosc", "no_shards", "two_shards", "transpose", "big_endian", "3d", "nan_fill"],
)
def test_other_layouts_are_left_to_zarr(tmp_path: Path, layout: str) -> None:
    """Only the uncompressed single-shard layout is read directly: anything else gives None."""
    store = zarr.storage.LocalStore(tmp_path)
    values = np.arange(120, dtype=np.float32).reshape(40, 3)
    kwargs: dict = {"chunks": (10, 3), "shards": (40, 3), "compressors": (), "fill_value": 0}
    if layout == "zstd":
        kwargs["compressors"] = (ZstdCodec(level=1),)
    elif layout == "blosc":
        kwargs["compressors"] = (BloscCodec(cname="zstd", clevel=1),)
    elif layout == "no_shards":
        del kwargs["shards"]
    elif layout == "two_shards":
        kwargs["shards"] = (20, 3)
    elif layout == "transpose":
        kwargs["filters"] = (TransposeCodec(order=(1, 0)),)
    elif layout == "big_endian":
        kwargs["serializer"] = BytesCodec(endian="big")
    elif layout == "3d":
        values = values.reshape(40, 3, 1)
        kwargs.update(chunks=(10, 3, 1), shards=(40, 3, 1))
    else:
        kwargs["fill_value"] = float("nan")
    zarr.create_array(store, name="a", data=values, **kwargs)
    assert ShardArray.open(tmp_path / "a") is None


def _fields(scan: ScanTargets) -> dict[str, tuple]:
    return {
        n: (getattr(scan, n).dtype.str, getattr(scan, n).shape, getattr(scan, n).tobytes())
        for n in ("points", "camera", "uv", "label", "target")
    }


def test_read_scan_fast_path_equals_zarr_path(tmp_path: Path) -> None:
    """A real cache, inner chunks of 16 rows so scans cross chunk borders: read_scan through
    the direct reads equals read_scan through zarr, byte for byte, also in a pickled copy."""
    writer = write_cache(tmp_path, layout=StorageLayout(chunk_rows=16))
    fast, slow = open_cache(writer.path), open_cache(writer.path, fast_path=False)
    clone = pickle.loads(pickle.dumps(fast))
    for i in range(len(fast)):
        want = _fields(slow.read_scan(i))
        assert _fields(fast.read_scan(i)) == want == _fields(clone.read_scan(i)), fast.tokens[i]
    for u in range(len(UNITS)):
        assert all(isinstance(a, ShardArray) for a in fast._open[u].arrays.values())
        assert all(isinstance(a, zarr.Array) for a in slow._open[u].arrays.values())
    assert max(a.shape[0] for a in slow._open[0].arrays.values()) > 16  # several inner chunks


@pytest.mark.parametrize(("target_codec", "other_codec"), [("zstd", "zstd"), ("none", "zstd")])
def test_compressed_cache_reads_through_zarr(
    tmp_path: Path, target_codec: str, other_codec: str
) -> None:
    layout = StorageLayout(chunk_rows=16, target_codec=target_codec, other_codec=other_codec)
    reader = open_cache(write_cache(tmp_path, layout=layout).path)
    expected = {t: (d, j) for d in unit_data() for j, t in enumerate(d.tokens)}
    for i, token in enumerate(reader.tokens):
        scan = reader.read_scan(i)
        d, j = expected[token]
        paired = d.camera[j] != -1
        for name in ("points", "camera", "uv", "label"):
            assert np.array_equal(getattr(scan, name), getattr(d, name)[j]), (token, name)
        assert np.array_equal(scan.target[paired], d.target[j][paired])
        assert not scan.target[~paired].any()
    arrays = reader._open[0].arrays
    assert isinstance(arrays["points"], zarr.Array) and isinstance(arrays["label"], zarr.Array)
    assert isinstance(arrays["target"], ShardArray if target_codec == "none" else zarr.Array)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "index checksum mismatch"),
        ("truncate_below_index", "less than its 20-byte index"),
        ("index_byte", "index checksum mismatch"),
        ("checksum_byte", "index checksum mismatch"),
        ("chunk_outside_file", "lies outside the data"),
        ("chunk_across_data_end", "lies outside the data"),
        ("chunk_size", "holds 1 bytes"),
        ("missing", "missing"),
        ("truncate_after_open", "index checksum mismatch"),
    ],
)
def test_damaged_shard_raises_cache_error_naming_the_file(
    tmp_path: Path, damage: str, message: str
) -> None:
    writer = write_cache(tmp_path)
    shard = writer.unit_dir(1) / "target" / "c" / "0" / "0"
    reader = open_cache(writer.path)
    if damage == "truncate_after_open":
        reader.read_scan(3)  # unit u00001 open, its index read: the shard changes afterwards
    raw = bytearray(shard.read_bytes())
    index = len(raw) - 20  # one inner chunk: (offset, nbytes) + crc32c
    if damage in ("truncate", "truncate_after_open"):
        raw = raw[:-7]
    elif damage == "truncate_below_index":
        raw = raw[:12]
    elif damage == "index_byte":
        raw[index + 9] ^= 0x01
    elif damage == "checksum_byte":
        raw[-1] ^= 0x80
    elif damage.startswith("chunk_"):  # a wrong entry with a valid crc32c
        offset, nbytes = np.frombuffer(bytes(raw[index : index + 16]), "<u8").tolist()
        assert offset + nbytes == index  # the one chunk ends where the index starts
        entry = {
            "chunk_outside_file": (len(raw), nbytes),
            "chunk_across_data_end": (offset + 1, nbytes),  # its last byte is the index's first
            "chunk_size": (offset, 1),
        }[damage]
        raw[index : index + 16] = np.array(entry, "<u8").tobytes()
        raw[-4:] = google_crc32c.value(bytes(raw[index : index + 16])).to_bytes(4, "little")
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=re.escape(str(shard)) + ".*" + message):
        reader.read_scan(3)
    assert open_cache(writer.path, fast_path=False).read_scan(0).token == "s0"  # other units


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "uint8", "int64"])
def test_direct_writers_equal_zarr_byte_for_byte(tmp_path: Path, dtype: str) -> None:
    """cache/shardwrite.py writes the folder zarr-python writes, every file identical: sharded
    arrays given as several parts (split anywhere, empty parts too) for 1-D and 2-D arrays,
    padded last chunks, all-zero chunks (left out), -0.0 chunks (kept: zarr compares bit
    patterns), all-zero and empty arrays (no shard file); plain single-chunk arrays; groups
    with attributes. The checksums it returns are those of the files."""
    from cache.shardwrite import file_checksum, write_group, write_plain_array, write_sharded_array

    rng = np.random.default_rng(0)
    arrays = [
        (rng.normal(size=(n, *t)) * 50).astype(dtype) for n in (1, 7, 1000) for t in ((), (5,))
    ]
    first_empty = np.zeros((100, 4), dtype)
    first_empty[60:] = 1
    arrays += [first_empty, np.zeros((50,), dtype), np.zeros((0, 3), dtype)]
    if dtype.startswith("float"):
        arrays.append(np.full((20, 2), -0.0, dtype))

    def files(d: Path) -> dict[str, bytes]:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}

    def checked(d: Path, written: dict) -> dict[str, bytes]:
        found = files(d)
        assert sorted(written) == sorted(found)
        for rel, f in written.items():
            assert f == {"size": len(found[rel]), "crc32c": file_checksum(d / rel)}, rel
        return found

    for i, arr in enumerate(arrays):
        cuts = np.sort(rng.integers(0, len(arr) + 1, 3))  # 4 parts, some maybe empty
        parts = np.split(arr, cuts)
        for chunk_rows in (1, 7, 64, 4096):
            k = max(1, -(-len(arr) // chunk_rows))  # as write_unit_group cuts a unit's arrays
            c = max(1, -(-len(arr) // k))
            geometry = dict(chunks=(c, *arr.shape[1:]), shards=(k * c, *arr.shape[1:]))
            theirs = tmp_path / f"z{i}-{chunk_rows}"
            zarr.create_array(theirs, data=arr, compressors=(), fill_value=0, **geometry)
            ours = tmp_path / f"o{i}-{chunk_rows}"
            got = checked(ours, write_sharded_array(ours, parts, chunk_rows=c, n_chunks=k))
            assert got == files(theirs), (arr.shape, chunk_rows, cuts)
            shard = [name for name in got if "/" in name]
            assert len(shard) == (1 if arr.any() or (arr.size and np.signbit(arr).any()) else 0)
        theirs, ours = tmp_path / f"pz{i}", tmp_path / f"po{i}"
        chunks = tuple(max(1, n) for n in arr.shape)
        zarr.create_array(theirs, data=arr, chunks=chunks, compressors=())
        assert checked(ours, write_plain_array(ours, arr)) == files(theirs), arr.shape

    attrs = {"schema_version": 2, "tokens": ["a", "é"], "lidar_paths": [], "x": 1.5}
    zarr.create_group(tmp_path / "gz", attributes=attrs)
    assert checked(tmp_path / "go", write_group(tmp_path / "go", attrs)) == files(tmp_path / "gz")
