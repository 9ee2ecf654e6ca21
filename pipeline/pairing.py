"""LiDAR point → (camera, pixel, depth) pairing, occlusion-aware. See docs/pairing.md.

Per camera the chain is lidar → ego(t_lidar) → global → ego(t_camera) → camera → pixels, with
the devkit's candidate rule: depth (camera z) above ``min_depth`` and ``1 < u < W - 1`` and
``1 < v < H - 1``. Ours, not the devkit's (it defines none): pixel (0, 0) covers [0, 1)², centre
(0.5, 0.5).
Occlusion: a coarse z-buffer of the candidates' depths (min per square cell, with
``zbuffer_cells_across`` cells across the image width, then min over the ``(2k+1)²`` neighbouring
cells) rejects a point lying more than
``max(occlusion_margin, occlusion_tolerance · z_ref)`` behind the nearest point of its
neighbourhood. A point visible in several cameras goes to the one where it lies farthest from the
image border (ties: the lower camera index).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import minimum_filter

from cache.schema import UNPAIRED
from pipeline.datasets.records import CameraFrame, Scan
from pipeline.geometry import invert_rigid, project_pinhole, transform_points


@dataclass(frozen=True)
class PairingConfig:
    """How LiDAR points are paired with camera pixels (part of the cache key)."""

    min_depth: float = 1.0
    """Minimum depth in the camera frame (m), as the devkit's ``min_dist``."""
    occlusion: bool = True
    """Reject points hidden behind a nearer surface in that camera (z-buffer test)."""
    zbuffer_cells_across: int = 160
    """Z-buffer resolution: square cells, this many across the image width (the same share of the
    image at any size: 10 px cells on a 1600-px nuScenes image, 4 px on the 640-px synthetic one;
    the angle a cell spans follows the focal length)."""
    zbuffer_neighbourhood: int = 1
    """Cells on each side of a point's cell that count as its neighbourhood (1 → 3x3)."""
    occlusion_tolerance: float = 0.15
    """Relative depth tolerance: occluded if depth > z_ref · (1 + tolerance) (and the margin)."""
    occlusion_margin: float = 0.5
    """Absolute depth tolerance (m); the larger of the two applies."""
    use_ego_motion: bool = True
    """Go through the global frame with both ego poses. False skips it (a deliberate bug, kept to
    prove that the tests and data catch it)."""

    def __post_init__(self) -> None:
        if not self.min_depth > 0:
            raise ValueError(f"min_depth must be > 0, got {self.min_depth}")
        if self.zbuffer_cells_across < 1 or self.zbuffer_neighbourhood < 0:
            raise ValueError("zbuffer_cells_across must be ≥ 1 and zbuffer_neighbourhood ≥ 0")
        if self.occlusion_tolerance < 0 or self.occlusion_margin < 0:
            raise ValueError("occlusion_tolerance and occlusion_margin must be ≥ 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pairing:
    """Pairing of N points. Unpaired points have camera −1, uv (0, 0) and depth 0."""

    camera: np.ndarray  # (N,) int8, index into scan.cameras, -1 = unpaired
    uv: np.ndarray  # (N, 2) float32, pixel coords (x right, y down) in the original image
    depth: np.ndarray  # (N,) float32, camera-frame z (m)


def lidar_to_camera(scan: Scan, camera: CameraFrame, use_ego_motion: bool = True) -> np.ndarray:
    """(4, 4) transform lidar frame (at the lidar time) → camera frame (at the camera time)."""
    camera_from_ego = invert_rigid(camera.sensor_to_ego)
    if not use_ego_motion:
        return camera_from_ego @ scan.sensor_to_ego
    ego_from_global = invert_rigid(camera.ego_to_global)
    return camera_from_ego @ ego_from_global @ scan.ego_to_global @ scan.sensor_to_ego


def project_to_camera(
    points_xyz: np.ndarray, scan: Scan, camera: int, use_ego_motion: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, 3) lidar-frame points into ``scan.cameras[camera]``.

    Returns ``uv`` (N, 2) float64 pixel coordinates and ``depth`` (N,) float64 camera z, for every
    point (no filtering: points behind the camera get meaningless uv).
    """
    frame = scan.cameras[camera]
    points_cam = transform_points(
        lidar_to_camera(scan, frame, use_ego_motion), points_xyz
    )  # (N, 3)
    return project_pinhole(frame.intrinsic, points_cam), points_cam[:, 2]


def in_image(
    uv: np.ndarray, depth: np.ndarray, width: int, height: int, min_depth: float
) -> np.ndarray:
    """(N,) bool: in front (depth > min_depth) and inside with the devkit's 1-px margin."""
    u, v = uv[:, 0], uv[:, 1]
    with np.errstate(invalid="ignore"):
        return (depth > min_depth) & (u > 1) & (u < width - 1) & (v > 1) & (v < height - 1)


def unoccluded(
    uv: np.ndarray, depth: np.ndarray, width: int, height: int, cfg: PairingConfig
) -> np.ndarray:
    """(M,) bool for M candidate points (all inside the image): not behind a nearer surface.

    z_ref = min depth over the point's z-buffer neighbourhood; occluded when
    depth > z_ref + max(margin, tolerance · z_ref).
    """
    cell = width / cfg.zbuffer_cells_across  # px
    grid_w, grid_h = cfg.zbuffer_cells_across, int(np.ceil(height / cell))
    col = np.minimum((uv[:, 0] // cell).astype(np.int64), grid_w - 1)  # (M,)
    row = np.minimum((uv[:, 1] // cell).astype(np.int64), grid_h - 1)  # (M,)
    cells = row * grid_w + col  # (M,)
    zbuffer = np.full(grid_h * grid_w, np.inf)
    np.minimum.at(zbuffer, cells, depth)
    size = 2 * cfg.zbuffer_neighbourhood + 1
    zbuffer = minimum_filter(
        zbuffer.reshape(grid_h, grid_w), size=size, mode="constant", cval=np.inf
    ).ravel()
    z_ref = zbuffer[cells]  # (M,)
    return depth <= z_ref + np.maximum(cfg.occlusion_margin, cfg.occlusion_tolerance * z_ref)


def camera_views(
    points_xyz: np.ndarray, scan: Scan, cfg: PairingConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-camera projections of (N, 3) points: ``uv`` (C, N, 2), ``depth`` (C, N) float64 and
    ``visible`` (C, N) bool (in front, inside, and unoccluded when ``cfg.occlusion``)."""
    n_cameras, n_points = len(scan.cameras), len(points_xyz)
    uv = np.zeros((n_cameras, n_points, 2))
    depth = np.zeros((n_cameras, n_points))
    visible = np.zeros((n_cameras, n_points), dtype=bool)
    for c, frame in enumerate(scan.cameras):
        uv[c], depth[c] = project_to_camera(points_xyz, scan, c, cfg.use_ego_motion)
        inside = in_image(uv[c], depth[c], frame.width, frame.height, cfg.min_depth)  # (N,)
        if cfg.occlusion and inside.any():
            idx = np.flatnonzero(inside)
            inside[idx] = unoccluded(uv[c, idx], depth[c, idx], frame.width, frame.height, cfg)
        visible[c] = inside
    return uv, depth, visible


def pair_points(points_xyz: np.ndarray, scan: Scan, cfg: PairingConfig) -> Pairing:
    """Pair (N, 3) lidar-frame points with at most one camera each (see the module docstring)."""
    points_xyz = np.asarray(points_xyz, dtype=np.float64)[:, :3]
    if not scan.cameras:  # e.g. a SemanticKITTI sequence without images
        n = len(points_xyz)
        return Pairing(
            camera=np.full(n, UNPAIRED, dtype=np.int8),
            uv=np.zeros((n, 2), dtype=np.float32),
            depth=np.zeros(n, dtype=np.float32),
        )
    uv, depth, visible = camera_views(points_xyz, scan, cfg)
    # Each point goes to the camera where its distance to the nearest image border is largest;
    # camera by camera over its visible points only (ties keep the lower camera index).
    n = len(points_xyz)
    best_border = np.full(n, -np.inf)
    camera = np.full(n, UNPAIRED, dtype=np.int8)
    for c, frame in enumerate(scan.cameras):
        idx = np.flatnonzero(visible[c])  # (M,)
        u, v = uv[c, idx, 0], uv[c, idx, 1]
        border = np.minimum(np.minimum(u, frame.width - u), np.minimum(v, frame.height - v))
        better = border > best_border[idx]
        best_border[idx[better]] = border[better]
        camera[idx[better]] = c
    paired = np.flatnonzero(camera != UNPAIRED)
    best_uv = np.zeros((n, 2), dtype=np.float32)
    best_depth = np.zeros(n, dtype=np.float32)
    best_uv[paired] = uv[camera[paired], paired]
    best_depth[paired] = depth[camera[paired], paired]
    return Pairing(camera=camera, uv=best_uv, depth=best_depth)
