"""SemanticKITTI reader (learning map, splits, poses, file validation) and the synthetic writer."""

import numpy as np
import pytest

from pipeline.datasets.semantickitti import (
    CLASS_NAMES,
    IGNORE_LABEL,
    SPLITS,
    SemanticKITTIReader,
    learning_map,
    map_labels,
)
from pipeline.synthetic.semantickitti import write_synthetic_semantickitti


@pytest.fixture
def kitti_root(synthetic_semantickitti):
    return synthetic_semantickitti


def test_learning_map_standard_entries():
    lm = learning_map()
    assert len(CLASS_NAMES) == 19 and CLASS_NAMES[0] == "car" and CLASS_NAMES[18] == "traffic-sign"
    assert lm[10] == 0 and lm[252] == 0  # car, moving-car → car
    assert lm[40] == 8 and lm[60] == 8  # road, lane-marking → road
    assert lm[13] == 4 and lm[257] == 4  # bus → other-vehicle
    assert lm[254] == 5 and lm[253] == 6  # moving person/bicyclist
    assert lm[81] == 18 and lm[72] == 16
    for raw in (0, 1, 52, 99):
        assert lm[raw] == IGNORE_LABEL
    assert sorted(set(lm.values()) - {IGNORE_LABEL}) == list(range(19))


def test_map_labels_uses_lower_16_bits_and_rejects_unknown_ids():
    raw = np.array([(7 << 16) | 10, 40, (3 << 16) | 252, 0, 81], dtype=np.uint32)
    np.testing.assert_array_equal(map_labels(raw), [0, 8, 0, 255, 18])
    # ids above 255 (moving bus, truck, other-vehicle) need all 16 bits, any instance above
    raw = np.array([257, (0xFFFF << 16) | 258, (1 << 16) | 259, 256], dtype=np.uint32)
    np.testing.assert_array_equal(map_labels(raw), [4, 3, 4, 4])
    with pytest.raises(ValueError, match="x.label.*\\[42\\]"):
        map_labels(np.array([42], dtype=np.uint32), source="x.label")


def test_splits_select_sequences(kitti_root):
    reader = SemanticKITTIReader(kitti_root)
    assert SPLITS["val"] == ("08",) and "08" not in SPLITS["train"] and len(SPLITS["train"]) == 10
    train, val = reader.scans("train"), reader.scans("val")
    assert [s.token for s in train] == ["00_000000", "00_000001", "03_000000", "03_000001"]
    assert [s.token for s in val] == ["08_000000", "08_000001"]
    assert [s.token for s in reader.scans("3")] == ["03_000000", "03_000001"]
    with pytest.raises(FileNotFoundError, match="test"):
        reader.scans("test")  # no test sequence on disk
    with pytest.raises(ValueError, match="unknown SemanticKITTI split"):
        reader.scans("mini_val")


def test_points_labels_and_poses(kitti_root):
    reader = SemanticKITTIReader(kitti_root)
    scans = reader.scans("val")
    pts = reader.load_points(scans[0])
    labels = reader.load_labels(scans[0])
    assert pts.dtype == np.float32 and pts.shape[1] == 4 and len(pts) > 500
    assert labels.dtype == np.uint8 and labels.shape == (len(pts),)
    present = set(np.unique(labels).tolist())
    assert {0, 8, 10, 12} <= present  # car, road, sidewalk, building
    assert present <= set(range(19)) | {255}
    # road points lie on the ground, 1.73 m below the sensor
    np.testing.assert_allclose(pts[labels == 8, 2], -1.73, atol=0.05)
    # lidar pose chain: the car drives 1.5 m along +x between scans, no rotation
    np.testing.assert_allclose(scans[0].ego_to_global, np.eye(4), atol=1e-9)
    expected = np.eye(4)
    expected[0, 3] = 1.5
    np.testing.assert_allclose(scans[1].ego_to_global, expected, atol=1e-9)
    assert scans[1].timestamp == 100_000 and scans[0].scene == "08" and scans[0].cameras == ()
    assert {p.name for p in reader.metadata_files()} == {"calib.txt", "poses.txt", "times.txt"}
    assert len(reader.metadata_files()) == 9


def test_truncated_files_give_errors_naming_the_file(kitti_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(kitti_root, root)
    reader = SemanticKITTIReader(root)
    scan = reader.scans("val")[0]
    with open(scan.lidar_path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 6)
    with pytest.raises(ValueError, match="000000.bin.*truncated"):
        reader.load_points(scan)
    scan2 = reader.scans("val")[1]
    with open(scan2.label_path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    with pytest.raises(ValueError, match="000001.label.*truncated or mismatched"):
        reader.load_labels(scan2)
    (root / "sequences" / "00" / "poses.txt").write_text("1 0 0\n")
    with pytest.raises(ValueError, match="poses.txt.*expected 12"):
        reader.scans("train")
    with pytest.raises(FileNotFoundError, match="no 'sequences/'"):
        SemanticKITTIReader(tmp_path)


def test_writer_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(FileExistsError):
        write_synthetic_semantickitti(tmp_path / "x")


def test_make_synthetic_cli_semantickitti_format(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "kitti"
    args = ["make-synthetic", "--format", "semantickitti", "--out", str(out), "--scenes", "3"]
    result = CliRunner().invoke(app, [*args, "--samples-per-scene", "1"])
    assert result.exit_code == 0, result.output
    reader = SemanticKITTIReader(out)
    assert reader.available_sequences() == ["00", "01", "08"]
    assert [s.token for s in reader.scans("val")] == ["08_000000"]
    labels = reader.load_labels(reader.scans("train")[0])
    assert (labels != IGNORE_LABEL).all()  # every synthetic return is labelled
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "not empty" in again.output


def test_pre_flight_check_reads_uint32_labels_and_names_missing_files(kitti_root, tmp_path):
    import shutil
    from pathlib import Path

    from pipeline.datasets import check_data, check_scan

    root = tmp_path / "copy"
    shutil.copytree(kitti_root, root)
    reader = SemanticKITTIReader(root)
    assert check_data(reader, "val") == []  # 4 bytes a point is the right label size
    first, second = reader.scans("val")
    with open(second.label_path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    problems = check_data(reader, "val")
    assert len(problems) == 1 and second.label_path in problems[0]
    assert "bytes of labels for" in problems[0] and "expected" in problems[0]
    Path(first.lidar_path).unlink()  # gone after the listing: named, not raised
    (problem,) = check_scan(reader, first)
    assert first.lidar_path in problem and "missing" in problem
    assert "test" in check_data(reader, "test")[0]  # no test sequence here: one line, no raise


# sequence 00 of the KITTI odometry calibration (calib.txt), P2 rounded to 7 digits
_P2_00 = "7.188560e+02 0 6.071928e+02 4.538225e+01 0 7.188560e+02 1.852157e+02 -1.130887e-01 0 0 1 3.779761e-03"
_TR_00 = (
    "4.276802385584e-04 -9.999672484946e-01 -8.084491683471e-03 -1.198459927713e-02 "
    "-7.210626507497e-03 8.081198471645e-03 -9.999413164504e-01 -5.403984729748e-02 "
    "9.999738645903e-01 4.859485810390e-04 -7.206933692422e-03 -2.921968648686e-01"
)


def test_camera_projects_points_like_the_kitti_devkit(tmp_path):
    """The CAM2 frame built from P2 and Tr projects a lidar point to the pixel of the KITTI
    devkit's formula ``P2 · Tr · [x, y, z, 1]`` (P2 = K [I | t]: t is K⁻¹ times its last column)."""
    from PIL import Image

    seq = tmp_path / "sequences" / "00"
    for sub in ("velodyne", "image_2"):
        (seq / sub).mkdir(parents=True)
    xyz = np.array([[10.0, 2.0, -1.0], [25.0, -4.0, 0.5], [6.0, 0.3, 0.2]])
    np.concatenate([xyz, np.zeros((3, 1))], 1).astype(np.float32).tofile(
        seq / "velodyne" / "000000.bin"
    )
    p0 = "7.188560e+02 0 6.071928e+02 0 0 7.188560e+02 1.852157e+02 0 0 0 1 0"
    (seq / "calib.txt").write_text(f"P0: {p0}\nP1: {p0}\nP2: {_P2_00}\nP3: {p0}\nTr: {_TR_00}\n")
    Image.new("RGB", (1241, 376)).save(seq / "image_2" / "000000.png")
    (scan,) = SemanticKITTIReader(tmp_path).scans("0")
    (camera,) = scan.cameras
    assert (camera.width, camera.height) == (1241, 376)
    homogeneous = np.concatenate([xyz, np.ones((3, 1))], 1).T  # (4, 3)
    p2 = np.array(_P2_00.split(), float).reshape(3, 4)
    tr = np.vstack([np.array(_TR_00.split(), float).reshape(3, 4), [0, 0, 0, 1]])
    uvw = p2 @ tr @ homogeneous
    expected = (uvw[:2] / uvw[2]).T  # (3, 2) devkit pixels
    in_camera = np.linalg.inv(camera.sensor_to_ego) @ homogeneous  # lidar = ego here
    ours = camera.intrinsic @ in_camera[:3]
    np.testing.assert_allclose((ours[:2] / ours[2]).T, expected, atol=1e-6)
    assert (uvw[2] > 0).all() and (expected[:, 0] > 0).all() and (expected[:, 0] < 1241).all()
