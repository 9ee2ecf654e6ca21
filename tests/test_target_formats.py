"""Target formats of the cache (issue 9): point-f16, point-i8, grid-f16, grid-i8 extracted from
the same split read back as the same `ScanTargets`; keys, old keys, verify, and training from a
grid."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache import CacheError, CacheKey, open_cache, verify_cache
from cache.schema import TARGET_FORMATS, dequantize_rows, quantize_rows
from pipeline.extract import ExtractConfig, extract_teacher

IMAGE_SIZE = (28, 56)  # 2 x 4 patches: seconds per extraction
SPLIT = "val"  # 4 scans, 2 units of 2
FORMATS = ("point-f16", "point-i8", "grid-f16", "grid-i8")


@pytest.fixture(scope="module")
def caches(synthetic_nuscenes, tiny_teacher: Path, tmp_path_factory) -> dict[str, Path]:
    """The same split extracted once per format into one cache root: format -> cache folder."""
    root = tmp_path_factory.mktemp("formats")
    cfg = ExtractConfig(
        data=synthetic_nuscenes.root,
        version=synthetic_nuscenes.version,
        cache_root=root,
        teacher=str(tiny_teacher),
        split=SPLIT,
        image_size=IMAGE_SIZE,
        n_workers=1,
        scans_per_unit=2,
        progress=False,
    )
    threads = torch.get_num_threads()
    try:
        return {f: Path(extract_teacher(replace(cfg, target_format=f)).cache_path) for f in FORMATS}
    finally:
        torch.set_num_threads(threads)


def _scans(path: Path) -> list:
    reader = open_cache(path)
    return [reader.read_scan(i) for i in range(len(reader))]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _same_points(a, b) -> None:
    assert a.token == b.token and a.lidar_path == b.lidar_path
    for name in ("points", "camera", "uv", "label"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_four_formats_four_caches_and_old_keys_read_as_point_f16(caches) -> None:
    keys = {f: open_cache(p).key for f, p in caches.items()}
    assert len({p.name for p in caches.values()}) == 4  # four digests, four folders
    assert {f: k.target_format for f, k in keys.items()} == {f: f for f in FORMATS}
    assert {f: k.schema_version for f, k in keys.items()} == {
        f: TARGET_FORMATS[f].schema_version for f in FORMATS
    }
    assert [k.schema_version for k in keys.values()] == [1, 2, 2, 3]
    f16 = keys["point-f16"]
    manifest = json.loads((caches["point-f16"] / "manifest.json").read_text())
    # point-f16 is the version-1 cache: no target_format in the key, digest unchanged
    assert "target_format" not in manifest["key"] and manifest["schema_version"] == 1
    old = f16.to_dict()  # what a version-1 manifest holds
    assert "target_format" not in old
    assert CacheKey.from_dict(old) == f16 and CacheKey.from_dict(old).digest() == f16.digest()
    assert json.loads(f16.canonical_json()).keys() == old.keys()
    i8 = json.loads((caches["point-i8"] / "manifest.json").read_text())["key"]
    assert i8["target_format"] == "point-i8" and i8["schema_version"] == 2
    with pytest.raises(ValueError, match="cannot hold target format 'grid-f16'"):
        CacheKey.from_dict({**old, "target_format": "grid-f16", "schema_version": 1})
    with pytest.raises(ValueError, match="cannot hold target format 'grid-i8'"):
        CacheKey.from_dict({**old, "target_format": "grid-i8", "schema_version": 2})
    with pytest.raises(ValueError, match="unknown target format 'bogus'"):
        replace(f16, target_format="bogus")
    for path in caches.values():
        assert verify_cache(path, progress=False) == []


def test_point_i8_is_within_half_a_step_of_point_f16(caches) -> None:
    for a, b in zip(_scans(caches["point-f16"]), _scans(caches["point-i8"]), strict=True):
        _same_points(a, b)
        paired = a.camera != -1
        assert b.target.dtype == np.float16 and b.target.shape == a.target.shape
        assert not b.target[~paired].any()
        x, x_hat = a.target[paired].astype(np.float32), b.target[paired].astype(np.float32)
        scale = np.abs(x).max(1, keepdims=True) / 127  # (P, 1)
        fp16 = np.abs(x).max(1, keepdims=True) * 2.0**-11  # half an fp16 ulp at the row max
        assert np.all(np.abs(x - x_hat) <= scale / 2 * (1 + 2.0**-10) + fp16)
        assert _cosine(x, x_hat).min() > 0.999
    # on disk: int8 rows and one float16 scale per paired point, as `quantize_rows` makes them
    unit = zarr.open_group(zarr.storage.LocalStore(caches["point-i8"] / "units/u00000"), mode="r")
    f16 = zarr.open_group(zarr.storage.LocalStore(caches["point-f16"] / "units/u00000"), mode="r")
    q, scale = quantize_rows(f16["target"][:])
    assert unit["target"].dtype == np.int8 and np.array_equal(unit["target"][:], q)
    assert unit["target_scale"].dtype == np.float16 and np.array_equal(
        unit["target_scale"][:], scale
    )


def test_quantize_rows_zero_rows_and_extremes() -> None:
    x = np.array([[0, 0, 0], [1, -2, 0.5], [65504, -65504, 1]], np.float16)
    q, scale = quantize_rows(x)
    assert scale[0] == 0 and not q[0].any()
    assert q[1].tolist() == [64, -127, 32] and q[2, :2].tolist() == [127, -127]
    x_hat = dequantize_rows(q, scale).astype(np.float32)  # finite at the float16 maximum
    assert np.all(np.abs(x_hat - x) <= scale[:, None].astype(np.float32) / 2 + 32)


def _quantize_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule of `quantize_rows`, written with numpy (how schema version 2 was first written)."""
    x32 = x.astype(np.float32)
    scale = (np.abs(x32).max(axis=1, initial=0.0) / 127.0).astype(np.float16)
    too_big = scale.astype(np.float32) * 127 > np.finfo(np.float16).max
    scale[too_big] = np.nextafter(scale[too_big], np.float16(0))
    s32 = scale.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(x32 / s32), 0.0)
    return np.clip(q, -127, 127).astype(np.int8), scale


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])  # fmt: skip
def test_quantize_rows_gives_numpys_bytes_on_every_device(device: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 384)) * rng.uniform(1e-6, 300, (3000, 1))).astype(np.float16)
    x[0] = 0
    x[1, :3] = [65504, -65504, 1]
    x[2] = 0
    x[2, :2] = [127, 63.5]  # scale 1, x / scale = 63.5 exactly: a tie, rounds to even
    x[3] = np.float16(6e-8)  # the scale underflows float16 to 0
    ref_q, ref_scale = _quantize_numpy(x)
    q, scale = quantize_rows(x)  # numpy in, numpy out
    assert np.array_equal(q, ref_q) and np.array_equal(
        scale.view(np.int16), ref_scale.view(np.int16)
    )
    tq, tscale = quantize_rows(torch.from_numpy(x).to(device))
    assert tq.device.type == device and tq.dtype == torch.int8 and tscale.dtype == torch.float16
    assert np.array_equal(tq.cpu().numpy(), ref_q)
    assert np.array_equal(tscale.cpu().numpy().view(np.int16), ref_scale.view(np.int16))
    assert q[2, :2].tolist() == [127, 64] and scale[3] == 0 and not q[3].any()
    empty_q, empty_scale = quantize_rows(np.zeros((0, 384), np.float16))
    assert empty_q.shape == (0, 384) and empty_scale.shape == (0,)


def test_grid_f16_samples_like_extraction(caches, synthetic_nuscenes) -> None:
    for a, c in zip(_scans(caches["point-f16"]), _scans(caches["grid-f16"]), strict=True):
        _same_points(a, c)
        paired = a.camera != -1
        assert c.target.dtype == np.float16 and not c.target[~paired].any()
        x, x_hat = a.target[paired].astype(np.float32), c.target[paired].astype(np.float32)
        # the only difference: the grid is rounded to fp16 before sampling (and the result is)
        assert np.abs(x - x_hat).max() <= 2.0**-9 * max(1.0, np.abs(x).max())
        assert _cosine(x, x_hat).min() > 0.999
    unit = zarr.open_group(zarr.storage.LocalStore(caches["grid-f16"] / "units/u00001"), mode="r")
    h, w = IMAGE_SIZE[0] // 14, IMAGE_SIZE[1] // 14
    sizes = unit["view_sizes"][:]  # (V, 4)
    assert sizes.tolist() == [[h, w, 360, 640]] * 12  # 2 scans x 6 cameras of 640x360
    assert unit["grid"].shape == (12 * h * w, 64) and unit["grid"].dtype == np.float16
    assert unit["view_offsets"][:].tolist() == [0, 6, 12]
    assert unit["grid_offsets"][:].tolist() == [0, 6 * h * w, 12 * h * w]
    assert "target" not in unit and "target_offsets" not in unit


def test_grid_i8_is_grid_f16_quantized_per_cell(caches) -> None:
    """grid-i8 stores `quantize_rows` of grid-f16's cells (quantized on the teacher's device:
    the same bytes), and reads back the samples of the dequantized grid: within half a
    quantisation step of grid-f16's targets (bilinear weights sum to 1)."""
    for name in ("u00000", "u00001"):
        f16 = zarr.open_group(zarr.storage.LocalStore(caches["grid-f16"] / "units" / name))
        i8 = zarr.open_group(zarr.storage.LocalStore(caches["grid-i8"] / "units" / name))
        q, scale = quantize_rows(f16["grid"][:])
        assert i8["grid"].dtype == np.int8 and np.array_equal(i8["grid"][:], q)
        assert i8["grid_scale"].dtype == np.float16 and np.array_equal(i8["grid_scale"][:], scale)
        for index in ("offsets", "view_offsets", "grid_offsets", "view_sizes"):
            assert np.array_equal(i8[index][:], f16[index][:]), index
    for c, g in zip(_scans(caches["grid-f16"]), _scans(caches["grid-i8"]), strict=True):
        _same_points(c, g)
        paired = c.camera != -1
        assert g.target.dtype == np.float16 and not g.target[~paired].any()
        x, x_hat = c.target[paired].astype(np.float32), g.target[paired].astype(np.float32)
        # per cell |error| <= scale / 2 <= max|grid| / 254, plus fp16 rounding of each side
        bound = np.abs(f16["grid"][:]).astype(np.float32).max() / 254 * (1 + 2.0**-9) + 2.0**-9
        assert np.abs(x - x_hat).max() <= bound * max(1.0, np.abs(x).max())
        assert _cosine(x, x_hat).min() > 0.999


def test_direct_reads_equal_zarr_reads(caches) -> None:
    for fmt in ("point-i8", "grid-f16", "grid-i8"):
        fast, slow = open_cache(caches[fmt]), open_cache(caches[fmt], fast_path=False)
        assert all(type(a).__name__ == "ShardArray" for a in fast._unit(0).arrays.values())
        for i in range(len(fast)):
            a, b = fast.read_scan(i), slow.read_scan(i)
            _same_points(a, b)
            assert np.array_equal(a.target, b.target), (fmt, i)


def _refresh_marker(unit_dir: Path) -> None:
    """Re-record sizes and checksums of a unit's files: only the structural checks can notice."""
    from cache.shardwrite import file_checksum

    marker_path = unit_dir.with_name(f"{unit_dir.name}.done")
    m = json.loads(marker_path.read_text())
    m["files"] = {
        p.relative_to(unit_dir).as_posix(): {"size": p.stat().st_size, "crc32c": file_checksum(p)}
        for p in sorted(unit_dir.rglob("*"))
        if p.is_file()
    }
    marker_path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("fmt", "damage", "message"),
    [
        ("point-i8", "flip target_scale", "unit u00001: file target_scale/c/0 checksum mismatch"),
        ("point-i8", "negative scale", "unit u00001: target_scale has 1 negative"),
        ("grid-f16", "grid rows", "unit u00001: grid has 91 rows, marker says 96"),
        ("grid-f16", "view size", "unit u00001: grid_offsets disagree with the h x w"),
        ("grid-f16", "few views", "unit u00001: last of view_offsets is"),
        ("grid-f16", "grid dtype", "unit u00001: grid is float32"),
        ("grid-i8", "negative grid scale", "unit u00001: grid_scale has 1 negative"),
        ("grid-i8", "few grid scales", "unit u00001: grid_scale has 95 rows for 96 grid rows"),
    ],
)
def test_verify_names_the_unit_of_a_damaged_new_array(
    caches, tmp_path: Path, fmt: str, damage: str, message: str
) -> None:
    path = tmp_path / caches[fmt].name
    shutil.copytree(caches[fmt], path)
    unit_dir = path / "units/u00001"
    if damage == "flip target_scale":
        shard = unit_dir / "target_scale/c/0"
        raw = bytearray(shard.read_bytes())
        raw[10] ^= 0x01
        shard.write_bytes(bytes(raw))
    else:
        group = zarr.open_group(zarr.storage.LocalStore(unit_dir), mode="r+")
        if damage == "negative scale":
            group["target_scale"][3] = -1
        elif damage == "negative grid scale":
            group["grid_scale"][7] = -1
        elif damage == "few grid scales":
            scale = group["grid_scale"][:-1]
            group.create_array("grid_scale", data=scale, chunks=(64,), overwrite=True)
        elif damage in ("grid rows", "grid dtype"):
            grid = group["grid"][:]
            grid = grid[:-5] if damage == "grid rows" else grid.astype(np.float32)
            group.create_array("grid", data=grid, chunks=(64, grid.shape[1]), overwrite=True)
        elif damage == "view size":
            group["view_sizes"][0, 1] += 1
        else:
            group["view_offsets"][2] -= 1
        _refresh_marker(unit_dir)
        if damage == "few grid scales":  # the marker agrees: only the structure can tell
            marker = unit_dir.with_name("u00001.done")
            m = json.loads(marker.read_text())
            m["arrays"]["grid_scale"]["rows"] -= 1
            marker.write_text(json.dumps(m))
    problems = verify_cache(path, progress=False)
    assert any(p.startswith(message) for p in problems), problems
    assert all(p.startswith("unit u00001") for p in problems), problems
    if damage in ("grid rows", "view size"):  # the reader refuses it too, naming the cache
        reader = open_cache(path)
        with pytest.raises(
            CacheError, match=rf"{re.escape(str(path))} unit u00001 scan .* grid rows"
        ):
            for i in range(len(reader)):
                reader.read_scan(i)


def test_training_reads_a_grid_cache_without_the_teacher(caches, synthetic_nuscenes, tmp_path):
    """A training smoke run (1 epoch, tiny student, a DataLoader worker) from the grid-f16 cache,
    in a fresh process that never imports the teacher or the extraction."""
    from conftest import run_cli_without_teacher

    argv = [
        "train", "--cache", str(caches["grid-f16"]), "--data", str(synthetic_nuscenes.root),
        "--version", synthetic_nuscenes.version, "--split", SPLIT, "--out", str(tmp_path / "run"),
        "--backbone", "tiny", "--batch-size", "2", "--epochs", "1", "--workers", "1",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    run_cli_without_teacher(argv)
    metrics = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
