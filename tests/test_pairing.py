"""Pairing: hand-built geometry (exact values), then the synthetic nuScenes set against the devkit
and against the rendered per-pixel class images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pyquaternion import Quaternion

from pipeline.datasets import CameraFrame, NuScenesReader, Scan
from pipeline.geometry import (
    check_intrinsic,
    check_unit_quaternion,
    invert_rigid,
    pose_matrix,
    transform_points,
)
from pipeline.pairing import (
    PairingConfig,
    camera_views,
    in_image,
    pair_points,
    project_to_camera,
)

W, H, F = 640, 360, 500.0
K = np.array([[F, 0.0, W / 2], [0.0, F, H / 2], [0.0, 0.0, 1.0]])
# camera → ego rotation of a camera looking along ego +x (camera x = −ego y, y = −ego z, z = ego x)
LOOK_FORWARD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def camera(
    yaw_deg: float = 0.0, ego_to_global: np.ndarray | None = None, name: str = "CAM"
) -> CameraFrame:
    """A camera at the ego origin looking along ego +x rotated by ``yaw_deg`` about +z."""
    yaw = Quaternion(axis=[0, 0, 1], degrees=yaw_deg).rotation_matrix
    rotation = Quaternion(matrix=yaw @ LOOK_FORWARD)
    return CameraFrame(
        channel=name,
        image_path="/nonexistent.jpg",
        width=W,
        height=H,
        intrinsic=K,
        sensor_to_ego=pose_matrix(list(rotation), [0.0, 0.0, 0.0]),
        ego_to_global=np.eye(4) if ego_to_global is None else ego_to_global,
        timestamp=0,
    )


def scan(*cameras: CameraFrame, ego_to_global: np.ndarray | None = None) -> Scan:
    return Scan(
        token="s",
        lidar_token="l",
        lidar_path="/nonexistent.pcd.bin",
        sensor_to_ego=np.eye(4),
        ego_to_global=np.eye(4) if ego_to_global is None else ego_to_global,
        timestamp=0,
        cameras=tuple(cameras),
        label_path=None,
        scene="scene",
    )


# ---------------------------------------------------------------- geometry ----


def test_pose_matrix_and_inverse_are_exact() -> None:
    q = Quaternion(axis=[0.3, -0.2, 1.0], degrees=37.0)
    transform = pose_matrix(list(q), [1.0, -2.0, 3.0])
    points = np.random.default_rng(0).normal(size=(50, 3)) * 20
    expected = points @ q.rotation_matrix.T + [1.0, -2.0, 3.0]
    np.testing.assert_allclose(transform_points(transform, points), expected, atol=1e-12)
    np.testing.assert_allclose(invert_rigid(transform) @ transform, np.eye(4), atol=1e-12)


@pytest.mark.parametrize(
    "rotation", [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [np.nan, 0, 0, 1]]
)
def test_bad_quaternion_is_rejected(rotation: list[float]) -> None:
    with pytest.raises(ValueError, match="rotation"):
        check_unit_quaternion(rotation)


@pytest.mark.parametrize(
    "intrinsic",
    [np.zeros((3, 3)), np.array([[500.0, 0, 320], [0, 0, 180], [0, 0, 1]]), np.eye(3)[:2]],
)
def test_bad_intrinsic_is_rejected(intrinsic: np.ndarray) -> None:
    with pytest.raises(ValueError, match="camera_intrinsic"):
        check_intrinsic(intrinsic)


# ---------------------------------------------------------------- pairing, exact values ----


def test_projection_of_known_points() -> None:
    s = scan(camera())
    points = np.array([[10.0, 0.0, 0.0], [10.0, 1.0, 0.0], [5.0, 0.0, -1.0]])
    uv, depth = project_to_camera(points, s, 0)
    np.testing.assert_allclose(depth, [10.0, 10.0, 5.0])
    # ego +y (left) is image −u; ego −z (down) is image +v
    np.testing.assert_allclose(uv, [[320.0, 180.0], [270.0, 180.0], [320.0, 280.0]])


def test_depth_and_border_filters_follow_the_devkit() -> None:
    s = scan(camera())
    # u = 320 − 500·y/x: choose y so that u lands exactly on 1, just inside 1, and on W − 1
    points = np.array(
        [
            [10.0, (320 - 1.0) / 50, 0.0],  # u == 1 → out (strict)
            [10.0, (320 - 1.01) / 50, 0.0],  # u == 1.01 → in
            [10.0, (320 - (W - 1.0)) / 50, 0.0],  # u == W − 1 → out
            [0.99, 0.0, 0.0],  # depth below min_depth → out
            [-10.0, 0.0, 0.0],  # behind → out
        ]
    )
    pairing = pair_points(points, s, PairingConfig(occlusion=False))
    assert pairing.camera.tolist() == [-1, 0, -1, -1, -1]
    assert pairing.uv[2].tolist() == [0.0, 0.0] and pairing.depth[3] == 0.0  # unpaired → zeros


def test_occluded_point_is_not_paired() -> None:
    s = scan(camera())
    rng = np.random.default_rng(1)
    # a wall 10 m ahead covering the image centre, densely sampled
    wall = np.column_stack([np.full(400, 10.0), rng.uniform(-2, 2, 400), rng.uniform(-1, 1, 400)])
    hidden = np.array([[30.0, 0.3, 0.1]])  # behind the wall, projects into it
    near_wall = np.array([[10.4, 0.0, 0.0]])  # within the 0.5 m margin: same surface
    beside = np.array([[30.0, 8.0, 0.0]])  # far, but left of the wall in the image (u = 187)
    points = np.concatenate([wall, hidden, near_wall, beside])
    on = pair_points(points, s, PairingConfig())
    off = pair_points(points, s, PairingConfig(occlusion=False))
    assert (on.camera[:400] == 0).all() and (off.camera == 0).all()
    assert on.camera[400:].tolist() == [-1, 0, 0]


def test_occlusion_tolerance_is_the_larger_of_margin_and_relative() -> None:
    """Behind the nearest surface of its neighbourhood, a point is hidden beyond
    max(0.5 m, 0.15 x depth): at 10 m the relative 1.5 m applies, at 2 m the 0.5 m margin."""
    s = scan(camera())
    rng = np.random.default_rng(2)
    for depth, kept, hidden in ((10.0, 1.2, 1.8), (2.0, 0.4, 0.6)):
        # a dense wall across the image centre (50 x 50 px), and two points on one ray behind it
        wall = np.column_stack([np.full(400, depth), rng.uniform(-0.05, 0.05, (400, 2)) * depth])
        ray = np.array([1.0, 0.01, 0.005])
        points = np.concatenate([wall, [ray * (depth + kept), ray * (depth + hidden)]])
        pairing = pair_points(points, s, PairingConfig())
        assert (pairing.camera[:400] == 0).all(), depth
        assert pairing.camera[400:].tolist() == [0, -1], depth


def test_point_seen_by_two_cameras_goes_to_the_one_where_it_is_most_central() -> None:
    s = scan(camera(0.0, name="A"), camera(-30.0, name="B"))  # B looks 30° to the right
    points = np.array([[10.0, -2.0, 0.0], [10.0, -4.5, 0.0], [10.0, 0.0, 0.0]])
    _, _, visible = camera_views(points, s, PairingConfig())
    assert visible.all(axis=0)[:2].all()  # the first two are seen by both
    pairing = pair_points(points, s, PairingConfig())
    assert pairing.camera.tolist() == [0, 1, 0]
    uv_b, depth_b = project_to_camera(points[1:2], s, 1)
    np.testing.assert_allclose(pairing.uv[1], uv_b[0], atol=1e-3)
    np.testing.assert_allclose(pairing.depth[1], depth_b[0], atol=1e-4)


def test_most_central_counts_the_top_and_bottom_borders_too() -> None:
    """B (15° right, pitched 25° down) sees the point near its centre column (u = 308) but 38 px
    below its top edge; A sees it 199 px from its side and 97 px from its bottom: A's nearest
    border is the farther one, whichever camera comes first."""
    import dataclasses

    yaw = Quaternion(axis=[0, 0, 1], degrees=-15).rotation_matrix
    pitch = Quaternion(axis=[0, 1, 0], degrees=25).rotation_matrix
    b = dataclasses.replace(
        camera(name="B"),
        sensor_to_ego=pose_matrix(list(Quaternion(matrix=yaw @ pitch @ LOOK_FORWARD)), [0, 0, 0]),
    )
    point = np.array([[16.5, -4.0, -2.75]])
    uv_b, _ = project_to_camera(point, scan(camera(name="A"), b), 1)
    np.testing.assert_allclose(uv_b[0], [307.7, 38.5], atol=0.1)
    assert pair_points(point, scan(camera(name="A"), b), PairingConfig()).camera.tolist() == [0]
    assert pair_points(point, scan(b, camera(name="A")), PairingConfig()).camera.tolist() == [1]


def test_ego_motion_is_applied() -> None:
    # The car moved 2 m forward between the lidar and the camera timestamps.
    moved = np.eye(4)
    moved[0, 3] = 2.0
    s = scan(camera(ego_to_global=moved))
    point = np.array([[12.0, 1.0, 0.0]])  # 12 m ahead at lidar time → 10 m ahead at camera time
    uv, depth = project_to_camera(point, s, 0)
    np.testing.assert_allclose(depth, [10.0])
    np.testing.assert_allclose(uv, [[270.0, 180.0]])
    uv_static, depth_static = project_to_camera(point, s, 0, use_ego_motion=False)
    np.testing.assert_allclose(depth_static, [12.0])
    assert abs(uv_static[0, 0] - 270.0) > 5


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        PairingConfig(min_depth=0.0)
    with pytest.raises(ValueError):
        PairingConfig(zbuffer_cells_across=0)


# ---------------------------------------------------------------- synthetic set vs devkit ----


@pytest.fixture(scope="module")
def dataroot(synthetic_nuscenes) -> Path:
    """Root of the generated synthetic nuScenes release (conftest's ``synthetic_nuscenes``)."""
    return Path(synthetic_nuscenes.root)


@pytest.fixture(scope="module")
def nusc_float64(dataroot: Path):
    """The devkit, with its point clouds kept in float64.

    ``LidarPointCloud`` stores points in float32 and rounds after every transform step; with global
    coordinates of hundreds of metres that alone moves pixels by ~1e-2 px. Keeping the devkit's
    arithmetic in float64 leaves its chain exactly as written and makes it a 1e-3 px reference.
    """
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud

    original = LidarPointCloud.__dict__["from_file"]

    def from_file_float64(cls, file_name: str) -> LidarPointCloud:
        cloud = original.__func__(cls, file_name)
        cloud.points = cloud.points.astype(np.float64)
        return cloud

    LidarPointCloud.from_file = classmethod(from_file_float64)
    try:
        yield NuScenes(version="v1.0-synthetic", dataroot=str(dataroot), verbose=False)
    finally:
        LidarPointCloud.from_file = original


@pytest.fixture(scope="module")
def reader(dataroot: Path) -> NuScenesReader:
    return NuScenesReader(dataroot, "v1.0-synthetic")


def test_projection_matches_the_devkit_on_every_scan_and_camera(
    reader: NuScenesReader, nusc_float64
) -> None:
    pairs = 0
    for scan in reader.scans("all"):
        points = reader.load_points(scan)[:, :3]
        sample = nusc_float64.get("sample", scan.token)
        seen_by_devkit = np.zeros(len(points), dtype=bool)
        for c, frame in enumerate(scan.cameras):
            kept, depth_kept, _ = nusc_float64.explorer.map_pointcloud_to_image(
                scan.lidar_token, sample["data"][frame.channel], min_dist=1.0
            )
            uv, depth = project_to_camera(points, scan, c)
            mask = in_image(uv, depth, frame.width, frame.height, min_depth=1.0)
            # same points kept, in the same order, at the same pixels and depths
            assert mask.sum() == kept.shape[1] > 0, (scan.token, frame.channel)
            np.testing.assert_allclose(uv[mask], kept[:2].T, rtol=0, atol=1e-3)
            np.testing.assert_allclose(depth[mask], depth_kept, rtol=0, atol=1e-6)
            seen_by_devkit |= mask
            pairs += 1
        # with occlusion off, a point is paired exactly when the devkit keeps it in some camera
        pairing = pair_points(points, scan, PairingConfig(occlusion=False))
        np.testing.assert_array_equal(pairing.camera >= 0, seen_by_devkit)
    assert pairs == 6 * len(reader.scans("all"))


def test_skipping_ego_motion_is_caught(reader: NuScenesReader) -> None:
    """The synthetic cameras fire before the LiDAR timestamp while the car drives, so a chain that
    skips the global frame puts most points on the wrong pixel."""
    offsets = []
    for scan in reader.scans("all"):
        points = reader.load_points(scan)[:, :3]
        for c, frame in enumerate(scan.cameras):
            uv, depth = project_to_camera(points, scan, c)
            mask = in_image(uv, depth, frame.width, frame.height, min_depth=1.0)
            uv_static, _ = project_to_camera(points[mask], scan, c, use_ego_motion=False)
            offsets.append(np.linalg.norm(uv_static - uv[mask], axis=1))
    offsets = np.concatenate(offsets)
    share = float((offsets > 1.0).mean())
    print(
        f"without ego motion: {share:.1%} of in-image points are > 1 px off (median {np.median(offsets):.2f} px)"
    )
    assert share > 0.5


def semantic_image(dataroot: Path, frame) -> np.ndarray:
    """(H, W) uint8 rendered lidarseg class per pixel (255 = sky) of a synthetic camera image."""
    name = Path(frame.image_path).name[: -len(".jpg")] + ".png"
    return np.asarray(Image.open(dataroot / "synthetic_semantic" / frame.channel / name))


def label_agreement(reader: NuScenesReader, dataroot: Path, cfg: PairingConfig) -> dict[str, float]:
    """Share of points paired, seen by > 1 camera, and of paired points whose pixel (rendered
    class image) has the point's lidarseg class."""
    n_points = n_paired = n_agree = n_multi = 0
    for scan in reader.scans("all"):
        points = reader.load_points(scan)[:, :3]
        raw = np.fromfile(scan.label_path, dtype=np.uint8)  # (N,) lidarseg index, as the images
        pairing = pair_points(points, scan, cfg)
        _, _, visible = camera_views(points, scan, cfg)
        n_multi += int((visible.sum(axis=0) > 1).sum())
        n_points += len(points)
        n_paired += int((pairing.camera >= 0).sum())
        for c, frame in enumerate(scan.cameras):
            mask = pairing.camera == c
            pixel = np.floor(pairing.uv[mask]).astype(np.int64)  # (M, 2) column, row
            n_agree += int(
                (semantic_image(dataroot, frame)[pixel[:, 1], pixel[:, 0]] == raw[mask]).sum()
            )
    return {"paired": n_paired / n_points, "multi": n_multi / n_points, "agree": n_agree / n_paired}


def test_paired_pixels_show_the_points_class(reader: NuScenesReader, dataroot: Path) -> None:
    on = label_agreement(reader, dataroot, PairingConfig())
    off = label_agreement(reader, dataroot, PairingConfig(occlusion=False))
    for name, stats in (("occlusion on", on), ("occlusion off", off)):
        print(
            f"{name}: {stats['paired']:.1%} of points paired, {stats['multi']:.1%} seen by > 1 camera, "
            f"{stats['agree']:.2%} of paired points on a pixel of their class"
        )
    assert on["agree"] >= 0.97
    assert off["agree"] < on["agree"] - 0.01  # the z-buffer removes real occlusions
    # it does not throw away much more than the occluded points
    assert on["paired"] > off["paired"] - 2.5 * (1 - off["agree"]) * off["paired"]
    assert 0.3 < on["paired"] < 0.95 and 0.0 < on["multi"] < 0.2


def test_no_points_or_no_cameras() -> None:
    empty = pair_points(np.zeros((0, 3)), scan(camera()), PairingConfig())
    assert empty.camera.shape == (0,) and empty.uv.shape == (0, 2) and empty.depth.shape == (0,)
    blind = pair_points(np.ones((4, 3)), scan(), PairingConfig())
    assert blind.camera.tolist() == [-1] * 4 and blind.camera.dtype == np.int8
