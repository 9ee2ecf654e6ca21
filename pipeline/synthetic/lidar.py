"""A 32-beam spinning LiDAR (HDL-32E-like, as on nuScenes) ray-cast into the synthetic world.

The whole sweep is cast from the sensor pose at the LiDAR timestamp: the rolling motion of the ego
during the 50 ms revolution is ignored (nuScenes sweeps do carry it). Points are returned in the
LiDAR frame (x right, y forward, z up as mounted on nuScenes), ordered by azimuth column, then ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synthetic.raycast import NOTHING, Region, cast
from pipeline.synthetic.surface import describe
from pipeline.synthetic.world import World

# nuScenes LIDAR_TOP mounting: ~0.94 m ahead of the rear axle, 1.84 m up, x axis pointing right.
LIDAR_TRANSLATION = (0.943, 0.0, 1.84)  # m, in the ego frame
LIDAR_YAW = -np.pi / 2  # rad, LiDAR frame → ego frame rotation about z


@dataclass(frozen=True)
class LidarConfig:
    """Spinning LiDAR model."""

    beams: int = 32  # lasers; ring 0 is the lowest
    elevation_min_deg: float = -30.67  # lowest beam elevation
    elevation_max_deg: float = 10.67  # highest beam elevation
    azimuth_steps: int = 1084  # firings per revolution (HDL-32E at 20 Hz)
    min_range: float = 1.0  # m, nearer returns are discarded
    max_range: float = 70.0  # m, farther returns are lost
    drop_rate: float = 0.03  # fraction of returns dropped at random
    range_noise: float = 0.01  # m, std of the Gaussian range noise

    def elevations(self) -> np.ndarray:
        """Beam elevations (beams,) in rad, ascending (= ring order)."""
        return np.deg2rad(np.linspace(self.elevation_min_deg, self.elevation_max_deg, self.beams))

    def azimuths(self) -> np.ndarray:
        """Column azimuths (azimuth_steps,) in rad in the LiDAR frame, ascending from +x."""
        return 2 * np.pi * np.arange(self.azimuth_steps) / self.azimuth_steps


@dataclass
class Sweep:
    """One LiDAR sweep."""

    points: np.ndarray  # (N, 5) float32 x, y, z, intensity (0..255), ring (LiDAR frame)
    labels: np.ndarray  # (N,) uint8 lidarseg index
    instance: np.ndarray  # (N,) int32 index into World.objects, -1 = none


def ray_directions(cfg: LidarConfig) -> np.ndarray:
    """Unit directions (beams, azimuth_steps, 3) in the LiDAR frame."""
    el = cfg.elevations()[:, None]
    az = cfg.azimuths()[None, :]
    return np.stack(
        [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el) * np.ones_like(az)], axis=-1
    )


def _regions(
    cfg: LidarConfig, global_to_lidar: np.ndarray, center: np.ndarray, radius: float
) -> list[Region]:
    """(ring, column) windows whose rays may hit the sphere (center (3,) global, radius)."""
    c = global_to_lidar[:3, :3] @ center + global_to_lidar[:3, 3]
    n = cfg.azimuth_steps
    dist = float(np.linalg.norm(c))
    if dist <= radius:
        return [(slice(None), slice(None))]
    el = cfg.elevations()
    beta = np.arcsin(radius / dist)
    el_c = np.arcsin(c[2] / dist)
    r0 = max(int(np.searchsorted(el, el_c - beta)) - 1, 0)
    r1 = min(int(np.searchsorted(el, el_c + beta)) + 1, cfg.beams)
    if r0 >= r1:
        return []
    rows = slice(r0, r1)
    dist_xy = float(np.hypot(c[0], c[1]))
    if dist_xy <= radius:
        return [(rows, slice(None))]
    alpha = np.arcsin(radius / dist_xy)
    phi = np.arctan2(c[1], c[0]) % (2 * np.pi)
    step = 2 * np.pi / n
    j0 = int(np.floor((phi - alpha) / step))
    j1 = int(np.ceil((phi + alpha) / step)) + 1
    if j0 < 0:
        return [(rows, slice(j0 + n, n)), (rows, slice(0, j1))]
    if j1 > n:
        return [(rows, slice(j0, n)), (rows, slice(0, j1 - n))]
    return [(rows, slice(j0, j1))]


def scan(
    world: World, lidar_to_global: np.ndarray, cfg: LidarConfig, rng: np.random.Generator
) -> Sweep:
    """Cast one sweep from the LiDAR pose ``lidar_to_global`` (4, 4)."""
    local_dirs = ray_directions(cfg)  # (B, A, 3)
    dirs = local_dirs @ lidar_to_global[:3, :3].T
    origin = lidar_to_global[:3, 3].copy()
    global_to_lidar = np.linalg.inv(lidar_to_global)
    hits = cast(origin, dirs, world.primitives, lambda c, r: _regions(cfg, global_to_lidar, c, r))

    # firing order: azimuth column, then ring
    t = hits.t.T.reshape(-1)
    prim = hits.prim.T.reshape(-1)
    d_global = dirs.transpose(1, 0, 2).reshape(-1, 3)
    d_local = local_dirs.transpose(1, 0, 2).reshape(-1, 3)
    ring = np.broadcast_to(np.arange(cfg.beams)[None, :], hits.t.T.shape).reshape(-1)

    valid = (prim != NOTHING) & (t >= cfg.min_range) & (t <= cfg.max_range)
    idx = np.flatnonzero(valid)
    surf = describe(world, origin, d_global[idx], t[idx], prim[idx])
    cos_inc = np.abs(np.sum(surf.normal * d_global[idx], axis=1))
    # dark, far, grazing returns are lost more often
    p_drop = (
        cfg.drop_rate + 0.15 * np.clip(0.2 - surf.reflectivity, 0, None) * t[idx] / cfg.max_range
    )
    u = rng.random(len(idx))
    noise = rng.normal(0.0, cfg.range_noise, len(idx))
    i_noise = rng.normal(0.0, 2.0, len(idx))
    keep = u >= p_drop
    idx, noise, i_noise, cos_inc = idx[keep], noise[keep], i_noise[keep], cos_inc[keep]
    refl = surf.reflectivity[keep]
    r = t[idx] + noise
    xyz = d_local[idx] * r[:, None]
    falloff = 1.0 - 0.4 * r / cfg.max_range
    intensity = np.clip(np.round(255 * refl * (0.3 + 0.7 * cos_inc) * falloff + i_noise), 0, 255)
    points = np.column_stack([xyz, intensity, ring[idx]]).astype(np.float32)
    return Sweep(points=points, labels=surf.label[keep], instance=surf.instance[keep])
