"""Tests of the synthetic nuScenes generator (pipeline/synthetic) against the official devkit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pyquaternion import Quaternion

from pipeline.synthetic import VERSION, SyntheticConfig, make_synthetic
from pipeline.synthetic.camera import CAMERA_RIG
from pipeline.synthetic.categories import SKY, WORLD_CLASSES
from pipeline.synthetic.raycast import (
    Primitive,
    intersect_box,
    intersect_cylinder,
    intersect_ground,
    intersect_sphere,
    surface_normals,
)

CAMERAS = [spec.channel for spec in CAMERA_RIG]
TABLES = (
    "attribute calibrated_sensor category ego_pose instance log map sample sample_annotation "
    "sample_data scene sensor visibility"
).split()


def _planes(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.asarray(d, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return d[:, 0], d[:, 1], d[:, 2]


# ---------------------------------------------------------------- ray casting ----
def test_primitive_intersections_hit_at_the_right_distance() -> None:
    o = np.array([0.0, 0.0, 1.0])
    dirs = _planes([[1, 0, 0], [0, 1, 0], [1, 0, -1], [0, 0, 1]])
    # box of length 2 centred 10 m ahead, yawed 90°: its x extent is then its width (1 m)
    t = intersect_box(o, dirs, np.array([10.0, 0.0, 1.0]), np.array([2.0, 1.0, 2.0]), np.pi / 2)
    assert t[0] == pytest.approx(9.5)
    assert np.isinf(t[1]) and np.isinf(t[2]) and np.isinf(t[3])
    t = intersect_cylinder(o, dirs, np.array([0.0, 5.0, 0.0]), 0.5, 3.0)
    assert t[1] == pytest.approx(4.5) and np.isinf(t[0])
    t = intersect_sphere(o, dirs, np.array([0.0, 0.0, 6.0]), 1.0)
    assert t[3] == pytest.approx(4.0) and np.isinf(t[0])
    t = intersect_ground(o, dirs)
    assert t[2] == pytest.approx(np.sqrt(2.0)) and np.isinf(t[0]) and np.isinf(t[3])
    # a cylinder seen from above is hit on its top cap
    t = intersect_cylinder(np.array([0.0, 0.0, 10.0]), _planes([[0, 0, -1]]), np.zeros(3), 0.5, 3.0)
    assert t[0] == pytest.approx(7.0)


def test_box_normals_point_outwards() -> None:
    box = Primitive("box", (0.0, 0.0, 1.0), (4.0, 2.0, 2.0), np.pi / 2, 17, -1, (1, 1, 1), "metal")
    pts = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 2.0]])  # yaw 90°: length along y
    n = surface_normals(box, pts)
    np.testing.assert_allclose(n, [[0, 1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)


# ---------------------------------------------------------------- the release, read by the devkit ----
@pytest.fixture(scope="module")
def nusc(synthetic_nuscenes):
    from nuscenes.nuscenes import NuScenes

    root, version = synthetic_nuscenes
    return NuScenes(version=version, dataroot=str(root), verbose=False)


def test_devkit_loads_all_tables(synthetic_nuscenes, nusc, capsys) -> None:
    root, version = synthetic_nuscenes
    assert version == VERSION == "v1.0-synthetic"
    for name in TABLES + ["lidarseg"]:
        assert (root / version / f"{name}.json").is_file(), name
    assert [s["name"] for s in nusc.scene] == ["scene-0001", "scene-0002"]
    assert len(nusc.sample) == 8 and len(nusc.sample_data) == 8 * 7
    nusc.list_scenes()
    assert "scene-0001" in capsys.readouterr().out
    assert [c["index"] for c in nusc.category] == list(range(32))
    assert nusc.lidarseg_name2idx_mapping["vehicle.car"] == 17
    for sample in nusc.sample:
        assert set(sample["data"]) == set(CAMERAS) | {"LIDAR_TOP"}
    mask = nusc.map[0]["mask"].mask()
    assert mask.dtype == np.uint8 and 0.01 < (mask == 255).mean() < 0.99
    assert len(nusc.sample_annotation) > 0 and len(nusc.instance) > 0


def test_points_and_labels_load_and_match(nusc) -> None:
    from nuscenes.utils.data_classes import LidarPointCloud

    seen: set[int] = set()
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        seg = nusc.get("lidarseg", sd["token"])
        pc = LidarPointCloud.from_file(os.path.join(nusc.dataroot, sd["filename"]))
        raw = np.fromfile(os.path.join(nusc.dataroot, sd["filename"]), dtype=np.float32).reshape(
            -1, 5
        )
        labels = np.fromfile(os.path.join(nusc.dataroot, seg["filename"]), dtype=np.uint8)
        n = pc.points.shape[1]
        assert 20_000 <= n <= 35_000
        assert len(labels) == n == len(raw)
        assert set(np.unique(labels)) <= set(WORLD_CLASSES)
        seen |= set(np.unique(labels).tolist())
        ring = raw[:, 4]
        assert ring.min() == 0 and ring.max() == 31 and np.all(ring == np.round(ring))
        assert 0 <= raw[:, 3].min() and raw[:, 3].max() <= 255
        r = np.linalg.norm(raw[:, :3], axis=1)
        assert r.min() >= 0.9 and r.max() <= 70.1
        # the lowest ring sees the ground ~3 m away, below the 1.84 m high sensor
        assert np.median(raw[ring == 0, 2]) == pytest.approx(-1.84, abs=0.1)
    assert seen == set(WORLD_CLASSES)


def test_chains_and_timestamps_are_consistent(nusc) -> None:
    for scene in nusc.scene:
        tokens, tok = [], scene["first_sample_token"]
        while tok:
            tokens.append(tok)
            tok = nusc.get("sample", tok)["next"]
        assert len(tokens) == scene["nbr_samples"] == 4 and tokens[-1] == scene["last_sample_token"]
        first = nusc.get("sample", tokens[0])
        for ch in CAMERAS + ["LIDAR_TOP"]:
            sd = nusc.get("sample_data", first["data"][ch])
            chain = [sd["token"]]
            while sd["next"]:
                nxt = nusc.get("sample_data", sd["next"])
                assert nxt["prev"] == sd["token"] and nxt["timestamp"] > sd["timestamp"]
                sd = nxt
                chain.append(sd["token"])
            assert chain == [nusc.get("sample", t)["data"][ch] for t in tokens]
        for t in tokens:
            sample = nusc.get("sample", t)
            lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            assert lidar["timestamp"] == sample["timestamp"] and lidar["is_key_frame"]
            offsets = []
            for ch in CAMERAS:
                sd = nusc.get("sample_data", sample["data"][ch])
                assert nusc.get("ego_pose", sd["ego_pose_token"])["timestamp"] == sd["timestamp"]
                offsets.append(sd["timestamp"] - lidar["timestamp"])
            assert all(-46_000 <= o <= 1_000 for o in offsets)
            assert len(set(offsets)) == 6 and max(offsets) - min(offsets) > 30_000
    for inst in nusc.instance:
        ann = nusc.get("sample_annotation", inst["first_annotation_token"])
        n = 1
        while ann["next"]:
            ann = nusc.get("sample_annotation", ann["next"])
            n += 1
        assert n == inst["nbr_annotations"] and ann["token"] == inst["last_annotation_token"]


def test_annotation_boxes_hold_their_lidar_points(synthetic_nuscenes, nusc) -> None:
    from nuscenes.utils.geometry_utils import points_in_box

    root = synthetic_nuscenes.root
    sample = nusc.sample[1]
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    raw = np.fromfile(root / lidar["filename"], dtype=np.float32).reshape(-1, 5)
    labels = np.fromfile(root / nusc.get("lidarseg", lidar["token"])["filename"], dtype=np.uint8)
    to_global = _matrix(nusc.get("ego_pose", lidar["ego_pose_token"])) @ _matrix(
        nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
    )
    xyz = raw[:, :3].astype(np.float64) @ to_global[:3, :3].T + to_global[:3, 3]  # (N, 3) global
    cars = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    cars = [a for a in cars if a["category_name"] == "vehicle.car"]
    assert len(cars) >= 3
    for ann in cars:
        inside = points_in_box(nusc.get_box(ann["token"]), xyz.T, wlh_factor=1.02)
        n_car = int((labels[inside] == 17).sum())
        assert abs(n_car - ann["num_lidar_pts"]) <= max(2, 0.05 * ann["num_lidar_pts"])
        assert set(labels[inside].tolist()) <= {17, 24, 26}  # the car, or ground under it


def _matrix(rec: dict) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Quaternion(rec["rotation"]).rotation_matrix
    m[:3, 3] = rec["translation"]
    return m


def _project(nusc, sample: dict, channel: str, xyz: np.ndarray, compensate: bool):
    """LiDAR points (N, 3) → pixel (u, v) (N, 2) and in-image mask in ``channel``, through
    lidar → ego(t_lidar) → global → ego(t_camera or t_lidar) → camera."""
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cam = nusc.get("sample_data", sample["data"][channel])
    cs_l = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
    cs_c = nusc.get("calibrated_sensor", cam["calibrated_sensor_token"])
    ego_l = _matrix(nusc.get("ego_pose", lidar["ego_pose_token"]))
    ego_c = _matrix(nusc.get("ego_pose", cam["ego_pose_token"])) if compensate else ego_l
    m = np.linalg.inv(_matrix(cs_c)) @ np.linalg.inv(ego_c) @ ego_l @ _matrix(cs_l)
    p = xyz @ m[:3, :3].T + m[:3, 3]
    k = np.asarray(cs_c["camera_intrinsic"])
    uv = (p @ k.T)[:, :2] / p[:, 2:3]
    ok = (
        (p[:, 2] > 1.0)
        & (uv[:, 0] >= 0)
        & (uv[:, 0] < cam["width"])
        & (uv[:, 1] >= 0)
        & (uv[:, 1] < cam["height"])
    )
    return uv, ok, cam


def test_lidar_points_project_onto_their_own_class(synthetic_nuscenes, nusc) -> None:
    """Correctly projected points land on pixels of their class (except where the camera sees
    something nearer); ignoring the ego motion between the timestamps moves them by > 1 px."""
    root = synthetic_nuscenes.root
    agree = total = 0
    shifts = []
    for sample in nusc.sample[:4]:
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        pts = (
            np.fromfile(root / lidar["filename"], dtype=np.float32)
            .reshape(-1, 5)[:, :3]
            .astype(np.float64)
        )
        labels = np.fromfile(
            root / nusc.get("lidarseg", lidar["token"])["filename"], dtype=np.uint8
        )
        for ch in CAMERAS:
            uv, ok, cam = _project(nusc, sample, ch, pts, compensate=True)
            uv_naive, ok_naive, _ = _project(nusc, sample, ch, pts, compensate=False)
            sem_path = root / "synthetic_semantic" / ch / (Path(cam["filename"]).name[:-4] + ".png")
            sem = np.asarray(Image.open(sem_path))
            assert sem.shape == (cam["height"], cam["width"])
            px = np.floor(uv[ok]).astype(int)
            agree += int((sem[px[:, 1], px[:, 0]] == labels[ok]).sum())
            total += int(ok.sum())
            both = ok & ok_naive
            shifts.append(np.linalg.norm(uv[both] - uv_naive[both], axis=1))
    print(
        f"agreement {agree / total:.4f} of {total}, naive shift > 1 px: {(np.concatenate(shifts) > 1).mean():.3f}"
    )
    assert total > 20_000
    assert agree / total > 0.9
    shifts = np.concatenate(shifts)
    assert (shifts > 1.0).mean() > 0.3


def test_images_and_semantic_images_exist(synthetic_nuscenes, nusc) -> None:
    root = synthetic_nuscenes.root
    sample = nusc.sample[0]
    seen: set[int] = set()
    for ch in CAMERAS:
        sd = nusc.get("sample_data", sample["data"][ch])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        img = Image.open(root / sd["filename"])
        assert img.format == "JPEG" and img.size == (sd["width"], sd["height"]) == (640, 360)
        k = np.asarray(cs["camera_intrinsic"])
        assert k[0, 0] == pytest.approx(k[1, 1]) and 250 < k[0, 0] < 520
        sem = np.asarray(
            Image.open(root / "synthetic_semantic" / ch / (Path(sd["filename"]).stem + ".png"))
        )
        classes = set(np.unique(sem).tolist())
        assert len(classes - {SKY}) >= 3
        seen |= classes
        if ch == "CAM_FRONT":  # the ego lane ahead is kept free: the image bottom is road
            assert np.all(sem[-1, 200:440] == 24)
    assert SKY in seen


# ---------------------------------------------------------------- determinism and CLI ----
def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path: Path) -> None:
    small = dict(scenes=1, samples_per_scene=2, width=160, height=90)
    a = _tree(make_synthetic(SyntheticConfig(out=tmp_path / "a", seed=3, workers=1, **small)))
    b = _tree(make_synthetic(SyntheticConfig(out=tmp_path / "b", seed=3, workers=2, **small)))
    c = _tree(make_synthetic(SyntheticConfig(out=tmp_path / "c", seed=4, workers=1, **small)))
    assert a == b
    assert (
        len(a) == 2 * 7 + 2 * 6 + 2 + 14 + 1 + 1
    )  # samples, semantic, lidarseg, tables, map, meta
    lidar = [k for k in a if k.endswith(".pcd.bin")]
    assert len(lidar) == 2
    assert set(a) != set(c) or any(a[k] != c[k] for k in a)
    assert a[f"{VERSION}/sample_data.json"] != c[f"{VERSION}/sample_data.json"]


def test_refuses_to_overwrite_and_leaves_no_partial_output(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = SyntheticConfig(out=out, scenes=1, samples_per_scene=1, width=32, height=18, workers=1)
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    make_synthetic(SyntheticConfig(**{**cfg.__dict__, "overwrite": True}))
    assert not (out / "keep.txt").exists() and (out / VERSION / "scene.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_cli_make_synthetic(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "cli"
    args = ["make-synthetic", "--out", str(out), "--scenes", "1", "--samples-per-scene", "2"]
    args += ["--seed", "7", "--width", "64", "--height", "36", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    scenes = json.loads((out / VERSION / "scene.json").read_text())
    assert len(scenes) == 1 and scenes[0]["nbr_samples"] == 2
    meta = json.loads((out / "synthetic_meta.json").read_text())
    assert meta["config"]["seed"] == 7 and meta["split"]["val"] == ["scene-0001"]
    again = CliRunner().invoke(app, args)  # refuses to overwrite, with a clear message
    assert again.exit_code == 1 and "not empty" in again.output
    bad = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "x"), "--scenes", "0"])
    assert bad.exit_code == 1 and "scenes" in bad.output


def test_an_out_under_a_file_or_a_broken_symlink_is_named_before_any_work(tmp_path: Path) -> None:
    """make-synthetic and make-teacher check --out's parents first: the nearest existing one
    must be a folder (a regular file, or a broken symlink, is named)."""
    from pipeline.outputs import check_parents

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    gone = tmp_path / "gone"
    gone.symlink_to(tmp_path / "nowhere")
    for parent in (a_file, gone):
        with pytest.raises(NotADirectoryError) as error:
            check_parents(parent / "sub" / "out")
        assert str(error.value) == f"{parent / 'sub' / 'out'}: {parent} exists and is not a folder"
    check_parents(tmp_path / "new" / "out")  # folders to be made: fine
    check_parents(a_file)  # out itself is make-synthetic's business (not empty, --overwrite)
