"""The 6-camera surround rig (nuScenes layout) and per-pixel ray-cast rendering.

Intrinsics are those of nuScenes (1600x900) scaled to the rendered resolution (640x360 by
default: factor 0.4). Each camera renders from the ego pose at its own timestamp, which precedes
the LiDAR timestamp by the time the spinning LiDAR needs to sweep from the camera's direction to
its end-of-sweep azimuth (0–45 ms, as in nuScenes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.synthetic.categories import SKY
from pipeline.synthetic.raycast import GROUND, Region, cast
from pipeline.synthetic.surface import describe
from pipeline.synthetic.world import World

FULL_WIDTH, FULL_HEIGHT = 1600, 900  # nuScenes image size the reference intrinsics belong to
SWEEP_US = 50_000  # LiDAR revolution (20 Hz)
SWEEP_END_YAW_DEG = 108.0  # ego-frame azimuth the LiDAR faces at its timestamp


@dataclass(frozen=True)
class CameraSpec:
    """Nominal mounting and intrinsics of one camera (nuScenes-like)."""

    channel: str  # "CAM_FRONT", ...
    yaw_deg: float  # viewing direction in the ego frame (0 = forward, + = left)
    translation: tuple[float, float, float]  # m, ego frame
    focal: float  # px at 1600x900
    principal: tuple[float, float]  # (cx, cy) px at 1600x900


CAMERA_RIG: tuple[CameraSpec, ...] = (
    CameraSpec("CAM_FRONT", 0.0, (1.70, 0.016, 1.51), 1266.4, (816.3, 491.5)),
    CameraSpec("CAM_FRONT_RIGHT", -55.0, (1.55, -0.493, 1.50), 1260.8, (808.0, 495.3)),
    CameraSpec("CAM_BACK_RIGHT", -110.0, (1.04, -0.481, 1.56), 1259.5, (807.2, 501.2)),
    CameraSpec("CAM_BACK", 180.0, (0.03, 0.0, 1.57), 809.2, (829.2, 481.8)),
    CameraSpec("CAM_BACK_LEFT", 110.0, (1.05, 0.484, 1.56), 1256.7, (817.8, 451.9)),
    CameraSpec("CAM_FRONT_LEFT", 55.0, (1.52, 0.494, 1.51), 1272.6, (826.6, 479.8)),
)

# camera frame (x right, y down, z forward) → ego frame (x forward, y left, z up) at yaw 0
_CAM_TO_EGO_BASE = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def intrinsic(spec: CameraSpec, width: int, height: int) -> np.ndarray:
    """(3, 3) pinhole matrix for a ``width`` x ``height`` image (nuScenes values scaled)."""
    sx, sy = width / FULL_WIDTH, height / FULL_HEIGHT
    return np.array(
        [
            [spec.focal * sx, 0.0, spec.principal[0] * sx],
            [0.0, spec.focal * sy, spec.principal[1] * sy],
            [0.0, 0.0, 1.0],
        ]
    )


def _rot(axis: int, a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def camera_rotation(yaw_deg: float, tilt: np.ndarray) -> np.ndarray:
    """Camera → ego rotation (3, 3) for a camera looking at ``yaw_deg`` with small extra rotations
    ``tilt`` (3,) (rad, about the camera x, y, z axes: pitch, yaw, roll)."""
    small = _rot(0, tilt[0]) @ _rot(1, tilt[1]) @ _rot(2, tilt[2])
    return _rot(2, np.deg2rad(yaw_deg)) @ _CAM_TO_EGO_BASE @ small


def firing_offset_us(yaw_deg: float) -> int:
    """Camera timestamp minus LiDAR timestamp (µs, <= 0): the LiDAR turns clockwise (yaw decreasing)
    and a camera is triggered when the beam crosses its axis."""
    return -round(SWEEP_US * (((yaw_deg - SWEEP_END_YAW_DEG) % 360.0) / 360.0))


def pixel_rays(k: np.ndarray, width: int, height: int) -> np.ndarray:
    """Unit ray directions (H, W, 3) in the camera frame through the pixel centres (u = col + 0.5)."""
    return _pixel_rays(tuple(k.ravel().tolist()), width, height).copy()


@functools.lru_cache(maxsize=8)
def _pixel_rays(k_flat: tuple[float, ...], width: int, height: int) -> np.ndarray:
    k = np.asarray(k_flat).reshape(3, 3)
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    d = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], axis=-1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _regions(
    k: np.ndarray,
    global_to_cam: np.ndarray,
    width: int,
    height: int,
    center: np.ndarray,
    radius: float,
) -> list[Region]:
    """Pixel rectangle that contains the projection of the sphere (center (3,) global, radius)."""
    near = 0.05
    c = global_to_cam[:3, :3] @ center + global_to_cam[:3, 3]
    if c[2] + radius <= near:
        return []
    if c[2] - radius <= near:
        return [(slice(None), slice(None))]
    corners = c + radius * np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    u = k[0, 0] * corners[:, 0] / corners[:, 2] + k[0, 2]
    v = k[1, 1] * corners[:, 1] / corners[:, 2] + k[1, 2]
    c0, c1 = max(int(np.floor(u.min() - 0.5)), 0), min(int(np.ceil(u.max() - 0.5)) + 1, width)
    r0, r1 = max(int(np.floor(v.min() - 0.5)), 0), min(int(np.ceil(v.max() - 0.5)) + 1, height)
    if c0 >= c1 or r0 >= r1:
        return []
    return [(slice(r0, r1), slice(c0, c1))]


@dataclass
class Frame:
    """One rendered camera image."""

    rgb: np.ndarray  # (H, W, 3) uint8
    classes: np.ndarray  # (H, W) uint8 lidarseg index per pixel, SKY where nothing is hit
    depth: np.ndarray  # (H, W) float32 distance along the ray (m), inf where nothing is hit


def render(
    world: World,
    k: np.ndarray,
    cam_to_global: np.ndarray,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> Frame:
    """Ray-cast every pixel centre of the camera at pose ``cam_to_global`` (4, 4)."""
    # float32 rays: half the memory traffic; t errors stay far below a millimetre
    dirs = (pixel_rays(k, width, height) @ cam_to_global[:3, :3].T).astype(np.float32)  # (H, W, 3)
    origin = cam_to_global[:3, 3].copy()
    global_to_cam = np.linalg.inv(cam_to_global)
    hits = cast(
        origin, dirs, world.primitives, lambda c, r: _regions(k, global_to_cam, width, height, c, r)
    )

    flat_dirs = dirs.reshape(-1, 3)
    t, prim = hits.t.reshape(-1), hits.prim.reshape(-1)
    hit = np.flatnonzero(prim >= GROUND)
    surf = describe(world, origin, flat_dirs[hit], t[hit], prim[hit])

    # sky: brighter towards the horizon
    up = np.clip(flat_dirs[:, 2], 0.0, 1.0)[:, None].astype(np.float32)
    horizon = np.array([0.78, 0.84, 0.9], dtype=np.float32)
    zenith = np.array([0.33, 0.52, 0.82], dtype=np.float32)
    colour = horizon + (zenith - horizon) * np.sqrt(up)  # (H*W, 3)

    sun = np.asarray(world.sun)
    light = 0.45 + 0.65 * np.clip(surf.normal @ sun, 0.0, None)  # (n_hit,)
    lit = surf.albedo * light[:, None].astype(np.float32)
    haze = (1.0 - np.exp(-t[hit] / 250.0))[:, None].astype(np.float32)
    colour[hit] = lit * (1 - haze) + horizon * haze
    colour += np.float32(0.012) * rng.standard_normal(colour.shape, dtype=np.float32)
    rgb = np.round(np.clip(colour, 0.0, 1.0) * 255).astype(np.uint8).reshape(height, width, 3)

    classes = np.full(width * height, SKY, dtype=np.uint8)
    classes[hit] = surf.label
    depth = hits.t.astype(np.float32)
    return Frame(rgb=rgb, classes=classes.reshape(height, width), depth=depth)
