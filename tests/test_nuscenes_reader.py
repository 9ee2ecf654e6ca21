"""nuScenes reader against the official devkit on the synthetic set, and bad input → clear errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.datasets import (
    CAMERA_CHANNELS,
    DataError,
    NuScenesReader,
    Scan,
    check_data,
    check_scan,
)
from pipeline.datasets.nuscenes import CLASS_NAMES, MINI_SPLITS

VERSION = "v1.0-synthetic"


@pytest.fixture(scope="module")
def dataroot(synthetic_nuscenes) -> Path:
    """Root of the generated synthetic nuScenes release (conftest's ``synthetic_nuscenes``)."""
    return Path(synthetic_nuscenes.root)


@pytest.fixture(scope="module")
def nusc(dataroot: Path):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=VERSION, dataroot=str(dataroot), verbose=False)


@pytest.fixture(scope="module")
def reader(dataroot: Path) -> NuScenesReader:
    return NuScenesReader(dataroot)  # the version is found on its own


def test_records_match_the_devkit(reader: NuScenesReader, nusc) -> None:
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    def pose(record: dict) -> np.ndarray:
        return transform_matrix(record["translation"], Quaternion(record["rotation"]))

    scans = reader.scans("all")
    assert reader.version == VERSION
    assert sorted(s.token for s in scans) == sorted(s["token"] for s in nusc.sample)
    for scan in scans:
        sample = nusc.get("sample", scan.token)
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        assert scan.lidar_token == lidar["token"] and scan.timestamp == lidar["timestamp"]
        assert scan.lidar_path == str(Path(nusc.get_sample_data_path(lidar["token"])).resolve())
        assert scan.scene == nusc.get("scene", sample["scene_token"])["name"]
        cs = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
        np.testing.assert_allclose(scan.sensor_to_ego, pose(cs), atol=1e-12)
        np.testing.assert_allclose(
            scan.ego_to_global, pose(nusc.get("ego_pose", lidar["ego_pose_token"])), atol=1e-9
        )
        assert tuple(c.channel for c in scan.cameras) == CAMERA_CHANNELS
        for frame in scan.cameras:
            sd = nusc.get("sample_data", sample["data"][frame.channel])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            assert frame.image_path == str(Path(nusc.get_sample_data_path(sd["token"])).resolve())
            assert (frame.width, frame.height, frame.timestamp) == (
                sd["width"],
                sd["height"],
                sd["timestamp"],
            )
            np.testing.assert_array_equal(frame.intrinsic, np.array(cs["camera_intrinsic"]))
            np.testing.assert_allclose(frame.sensor_to_ego, pose(cs), atol=1e-12)
            np.testing.assert_allclose(
                frame.ego_to_global, pose(nusc.get("ego_pose", sd["ego_pose_token"])), atol=1e-9
            )
    # scans come ordered by scene, then time
    keys = [(reader.scene_names("all").index(s.scene), s.timestamp) for s in scans]
    assert keys == sorted(keys)


def test_points_and_labels_match_the_devkit(reader: NuScenesReader, nusc) -> None:
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper
    from nuscenes.utils.data_classes import LidarPointCloud

    mapper = LidarsegClassMapper(nusc)
    # our class i is the challenge's coarse index i + 1 (0 = ignore there, 255 here)
    coarse_names = {i: n for n, i in mapper.coarse_name_2_coarse_idx_mapping.items()}
    assert tuple(coarse_names[i + 1] for i in range(16)) == CLASS_NAMES == reader.class_names
    lut = np.full(256, -1)
    for fine, coarse in mapper.fine_idx_2_coarse_idx_mapping.items():
        lut[fine] = 255 if coarse == 0 else coarse - 1
    ours = np.zeros(256, dtype=np.int64)
    theirs = np.zeros(256, dtype=np.int64)
    for scan in reader.scans("all"):
        points = reader.load_points(scan)
        expected_points = LidarPointCloud.from_file(scan.lidar_path).points.T  # (N, 4)
        np.testing.assert_array_equal(points, expected_points)
        assert points.dtype == np.float32 and points.shape[1] == 4
        raw = np.fromfile(
            Path(nusc.dataroot) / nusc.get("lidarseg", scan.lidar_token)["filename"], dtype=np.uint8
        )
        labels = reader.load_labels(scan)
        assert labels.dtype == np.uint8 and labels.shape == (len(points),)
        np.testing.assert_array_equal(labels, lut[raw])
        ours += np.bincount(labels, minlength=256)
        theirs += np.bincount(lut[raw], minlength=256)
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[:16] > 0).sum() >= 5, "the synthetic set should contain several classes"


def test_splits(reader: NuScenesReader) -> None:
    scenes = reader.scene_names("all")
    assert len(scenes) >= 2
    assert reader.scene_names("val") == scenes[-1:]
    assert reader.scene_names("train") == scenes[:-1]
    train, val = reader.scans("train"), reader.scans("val")
    assert len(train) + len(val) == len(reader.scans("all"))
    assert {s.scene for s in val} == {scenes[-1]} and scenes[-1] not in {s.scene for s in train}
    with pytest.raises(DataError, match="unknown split"):
        reader.scans("test")


def test_mini_split_lists_are_the_official_ones() -> None:
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes(verbose=False)
    for name, scenes in MINI_SPLITS.items():
        assert list(scenes) == official[name]


def test_images_and_pickling(reader: NuScenesReader) -> None:
    scan = reader.scans("val")[0]
    frame = scan.cameras[0]
    image = reader.load_image(frame)
    assert image.shape == (frame.height, frame.width, 3) and image.dtype == np.uint8
    assert image.std() > 0
    clone = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < 4096  # the JSON tables are not shipped to workers
    restored = pickle.loads(pickle.dumps(scan))
    assert isinstance(restored, Scan) and restored.token == scan.token
    assert [s.token for s in clone.scans("val")] == [s.token for s in reader.scans("val")]
    assert reader.metadata_files() and all(p.suffix == ".json" for p in reader.metadata_files())


def test_a_worker_reads_points_labels_and_images_without_the_tables(
    reader: NuScenesReader,
) -> None:
    """What an extraction worker does with its unpickled reader loads no JSON table but
    category.json (v1.0-trainval's tables are gigabytes of dicts per worker process)."""
    scan = reader.scans("train")[0]
    worker = pickle.loads(pickle.dumps(reader))
    labels = worker.load_labels(scan)
    np.testing.assert_array_equal(labels, reader.load_labels(scan))
    assert worker.load_points(scan).shape[0] == labels.shape[0]
    worker.load_image(scan.cameras[0])
    assert "_tables" not in worker.__dict__ and "_keyframes_by_sample" not in worker.__dict__


def test_clean_set_has_no_problems(dataroot: Path, reader: NuScenesReader) -> None:
    assert check_data(reader, "all") == []
    from cli import app

    result = CliRunner().invoke(app, ["check-data", "--data", str(dataroot)])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- bad input ----


@pytest.fixture
def copy(tmp_path: Path, dataroot: Path) -> Path:
    """The synthetic set with every file symlinked; tests replace the file they corrupt."""
    root = tmp_path / "nuscenes"
    shutil.copytree(dataroot, root, copy_function=os.symlink)
    return root


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def edit_table(root: Path, table: str, edit) -> None:
    path = root / VERSION / f"{table}.json"
    records = json.loads(path.read_text())
    edit(records)
    replace(path, json.dumps(records).encode())


def first_scan(root: Path) -> tuple[NuScenesReader, Scan]:
    reader = NuScenesReader(root, VERSION)
    return reader, reader.scans("all")[0]


def cli_output(root: Path) -> tuple[int, str]:
    from cli import app

    result = CliRunner().invoke(app, ["check-data", "--data", str(root), "--version", VERSION])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda data: data[:-7], "truncated lidar file"),
        (lambda data: b"", "lidar file is empty"),
        (
            lambda data: (
                np.where(np.arange(len(data) // 4) == 20, np.nan, np.frombuffer(data, np.float32))
                .astype(np.float32)
                .tobytes()
            ),
            "NaN/Inf",
        ),
        (
            lambda data: (
                np.where(np.arange(len(data) // 4) == 6, np.inf, np.frombuffer(data, np.float32))
                .astype(np.float32)
                .tobytes()
            ),
            "NaN/Inf",
        ),
    ],
    ids=["truncated", "empty", "nan", "inf"],
)
def test_bad_lidar_file(copy: Path, corrupt, message: str) -> None:
    reader, scan = first_scan(copy)
    path = Path(scan.lidar_path)
    replace(path, corrupt(path.read_bytes()))
    with pytest.raises(DataError, match=message) as error:
        reader.load_points(scan)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    problems = check_scan(reader, scan)
    assert any(str(path) in p and message in p for p in problems)
    code, output = cli_output(copy)
    assert code == 1 and str(path) in output


def test_label_file_of_wrong_length(copy: Path) -> None:
    reader, scan = first_scan(copy)
    path = Path(scan.label_path)
    replace(path, path.read_bytes()[:-1])
    with pytest.raises(DataError, match="labels for") as error:
        reader.load_labels(scan)
    assert str(path) in str(error.value)
    assert any(str(path) in p for p in check_scan(reader, scan))


def test_label_value_without_a_category_is_found_before_extraction(copy: Path) -> None:
    reader, scan = first_scan(copy)
    path = Path(scan.label_path)
    raw = bytearray(path.read_bytes())
    raw[3] = 200  # no category.index 200 in the synthetic release
    replace(path, bytes(raw))
    (problem,) = check_scan(reader, scan)
    assert str(path) in problem and "[200] are not a category.index" in problem
    code, output = cli_output(copy)
    assert code == 1 and str(path) in output


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_bad_image(copy: Path, damage: str) -> None:
    reader, scan = first_scan(copy)
    frame = scan.cameras[2]
    path = Path(frame.image_path)
    data = path.read_bytes()
    path.unlink()
    if damage == "garbage":
        path.write_bytes(b"this is not a jpeg" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        reader.load_image(frame)
    assert str(path) in str(error.value)
    if damage != "truncated":  # a truncated JPEG keeps a valid header: only decoding finds it
        assert any(str(path) in p for p in check_scan(reader, scan))
        code, output = cli_output(copy)
        assert code == 1 and str(path) in output


def test_non_unit_quaternion(copy: Path) -> None:
    bad = {}

    def edit(records: list[dict]) -> None:
        record = next(r for r in records if r["camera_intrinsic"])  # a camera
        record["rotation"] = [2 * x for x in record["rotation"]]
        bad["token"] = record["token"]

    edit_table(copy, "calibrated_sensor", edit)
    with pytest.raises(DataError, match="not unit") as error:
        NuScenesReader(copy, VERSION).scans("all")
    assert "calibrated_sensor.json" in str(error.value) and bad["token"] in str(error.value)
    code, output = cli_output(copy)
    assert code == 1 and bad["token"] in output


def test_singular_intrinsic(copy: Path) -> None:
    bad = {}

    def edit(records: list[dict]) -> None:
        record = next(r for r in records if r["camera_intrinsic"])
        record["camera_intrinsic"][1] = [0.0, 0.0, 0.0]
        bad["token"] = record["token"]

    edit_table(copy, "calibrated_sensor", edit)
    with pytest.raises(DataError, match="singular") as error:
        NuScenesReader(copy, VERSION).scans("all")
    assert "calibrated_sensor.json" in str(error.value) and bad["token"] in str(error.value)


def test_missing_ego_pose_record(copy: Path) -> None:
    _, scan = first_scan(copy)
    sample_data = json.loads((copy / VERSION / "sample_data.json").read_text())
    missing = next(sd["ego_pose_token"] for sd in sample_data if sd["token"] == scan.lidar_token)
    edit_table(
        copy,
        "ego_pose",
        lambda records: records.remove(next(r for r in records if r["token"] == missing)),
    )
    with pytest.raises(DataError, match="no record with token") as error:
        NuScenesReader(copy, VERSION).scans("all")
    assert "ego_pose.json" in str(error.value) and missing in str(error.value)
    assert scan.lidar_token in str(error.value)  # names the referring record too


def test_sample_without_its_camera(copy: Path) -> None:
    _, scan = first_scan(copy)
    image = scan.cameras[CAMERA_CHANNELS.index("CAM_BACK")].image_path

    def edit(records: list[dict]) -> None:
        records.remove(next(r for r in records if str((copy / r["filename"]).absolute()) == image))

    edit_table(copy, "sample_data", edit)
    with pytest.raises(DataError, match="CAM_BACK") as error:
        NuScenesReader(copy, VERSION).scans("all")
    assert scan.token in str(error.value) and "sample.json" in str(error.value)


def test_missing_version_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="version"):
        NuScenesReader(tmp_path)
    code, output = cli_output(tmp_path)
    assert code == 1


def test_sample_pointing_at_a_missing_scene(copy: Path) -> None:
    _, scan = first_scan(copy)

    def edit(records: list[dict]) -> None:
        next(r for r in records if r["token"] == scan.token)["scene_token"] = "f" * 32

    edit_table(copy, "sample", edit)
    with pytest.raises(DataError, match="no record with token") as error:
        NuScenesReader(copy, VERSION).scans("all")
    assert "scene.json" in str(error.value) and scan.token in str(error.value)


def test_sweeps_between_keyframes_are_not_scans(copy: Path, reader: NuScenesReader) -> None:
    """Real nuScenes has ~10 non-keyframe sample_data records (sweeps) per keyframe and sensor,
    pointing at the nearest sample: the synthetic set has none, so add some. The scans (and
    their camera frames) stay the keyframes', and check-data is clean."""

    def add_sweeps(records: list[dict]) -> None:
        for sd in [r for r in records if r["is_key_frame"]]:
            for k in (1, 2):
                records.append(
                    {
                        **sd,
                        "token": f"{sd['token']}-sweep{k}",
                        "is_key_frame": False,
                        "timestamp": sd["timestamp"] + 50_000 * k,
                        "filename": sd["filename"].replace("samples/", "sweeps/", 1),
                    }
                )

    edit_table(copy, "sample_data", add_sweeps)
    swept = NuScenesReader(copy, VERSION)
    assert len(json.loads((copy / VERSION / "sample_data.json").read_text())) == 3 * len(
        reader._tables["sample_data"]
    )
    for mine, theirs in zip(swept.scans("all"), reader.scans("all"), strict=True):
        assert mine.token == theirs.token and mine.timestamp == theirs.timestamp
        assert Path(mine.lidar_path).relative_to(copy) == Path(theirs.lidar_path).relative_to(
            reader.root
        )
        assert [Path(c.image_path).name for c in mine.cameras] == [
            Path(c.image_path).name for c in theirs.cameras
        ]
        assert all("/samples/" in str(c.image_path) for c in mine.cameras)
    code, output = cli_output(copy)
    assert code == 0, output


def test_every_category_maps_like_the_devkit(copy: Path, nusc) -> None:
    """A label file holding every category.index of the release (noise, the classes the
    challenge ignores, both buses, ...) maps as the devkit's LidarsegClassMapper maps it."""
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper

    mapper = LidarsegClassMapper(nusc)
    lut = np.full(256, -1)
    for fine, coarse in mapper.fine_idx_2_coarse_idx_mapping.items():
        lut[fine] = 255 if coarse == 0 else coarse - 1
    indices = np.array(sorted(c["index"] for c in nusc.category))
    assert len(indices) == 32 and (lut[indices] >= 0).all()
    reader, scan = first_scan(copy)
    raw = np.resize(indices, len(reader.load_points(scan))).astype(np.uint8)
    replace(Path(scan.label_path), raw.tobytes())
    np.testing.assert_array_equal(reader.load_labels(scan), lut[raw])
