"""LiDAR corruptions in the spirit of nuScenes-C / Robo3D: pure, seeded functions of one scan.

Every corruption takes a point cloud ``(N, 4)`` float32 (x, y, z, intensity, lidar frame) and
returns a :class:`Corrupted` cloud whose ``index`` maps each remaining point to its row in the
input, so labels follow with ``labels[corrupted.index]``. Same input + same seed → same output.

Beam-wise corruptions need a ring (beam) id per point. :func:`elevation_beams` estimates it from
the elevation angle (uniform bins between the scan's lowest and highest elevation), which is exact
for sensors with uniformly spaced beams such as the nuScenes HDL-32E and approximate for the
HDL-64E; when a reader provides the true ring channel, pass that instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Corrupted:
    """A corrupted scan."""

    points: np.ndarray
    """(M, 4) float32 corrupted points."""
    index: np.ndarray
    """(M,) int64 row of each point in the clean scan."""


def elevation_beams(xyz: np.ndarray, n_beams: int) -> np.ndarray:
    """(N,) int64 beam id 0..n_beams-1 from elevation bins (0 = lowest)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    elevation = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))  # (N,)
    if len(elevation) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = elevation.min(), elevation.max()
    scaled = (elevation - lo) / max(hi - lo, 1e-9) * n_beams
    return np.clip(scaled.astype(np.int64), 0, n_beams - 1)


def _keep(points: np.ndarray, mask: np.ndarray) -> Corrupted:
    index = np.flatnonzero(mask).astype(np.int64)
    return Corrupted(points=np.ascontiguousarray(points[index]), index=index)


def drop_beams(points: np.ndarray, beam: np.ndarray, dropped: np.ndarray) -> Corrupted:
    """Remove exactly the points of the beams in ``dropped``."""
    return _keep(points, ~np.isin(beam, dropped))


def beam_missing(points: np.ndarray, beam: np.ndarray, fraction: float, seed: int) -> Corrupted:
    """Beam missing: a random ``fraction`` of the beams present in the scan return nothing."""
    beams = np.unique(beam)
    n_drop = int(round(fraction * len(beams)))
    dropped = np.random.default_rng(seed).choice(beams, size=n_drop, replace=False)
    return drop_beams(points, beam, dropped)


def fewer_beams(points: np.ndarray, beam: np.ndarray, keep_every: int) -> Corrupted:
    """A sensor with fewer beams: keep one beam in ``keep_every`` (32 → 16 for 2)."""
    return _keep(points, beam % keep_every == 0)


def drop_points(points: np.ndarray, fraction: float, seed: int) -> Corrupted:
    """Random point drop: each point is lost independently with probability ``fraction``."""
    rng = np.random.default_rng(seed)
    return _keep(points, rng.random(len(points)) >= fraction)


def cross_sensor(
    points: np.ndarray, beam: np.ndarray, keep_every: int, point_fraction: float, seed: int
) -> Corrupted:
    """Cross-sensor: fewer beams, then a random ``point_fraction`` of the rest dropped."""
    sparse = fewer_beams(points, beam, keep_every)
    dropped = drop_points(sparse.points, point_fraction, seed)
    return Corrupted(points=dropped.points, index=sparse.index[dropped.index])


def jitter(points: np.ndarray, sigma: float, seed: int) -> Corrupted:
    """Gaussian noise of standard deviation ``sigma`` (m) on x, y, z; no point is lost."""
    out = points.astype(np.float32, copy=True)
    out[:, :3] += np.random.default_rng(seed).normal(0.0, sigma, (len(out), 3)).astype(np.float32)
    return Corrupted(points=out, index=np.arange(len(points), dtype=np.int64))


def fog(points: np.ndarray, beta: float, seed: int) -> Corrupted:
    """Fog-like loss: two-way Beer–Lambert attenuation ``a(r) = exp(-2 β r)``.

    A return at range r survives with probability a(r) and its intensity is scaled by a(r); far
    points vanish first. ``beta`` is the extinction coefficient (1/m); β = 0.01 keeps ~37 % of the
    returns at 50 m. (Back-scatter clutter near the sensor is not simulated.)
    """
    r = np.linalg.norm(points[:, :3].astype(np.float64), axis=1)  # (N,)
    attenuation = np.exp(-2.0 * beta * r)
    kept = _keep(points, np.random.default_rng(seed).random(len(points)) < attenuation)
    out = kept.points.astype(np.float32, copy=True)
    out[:, 3] *= attenuation[kept.index].astype(np.float32)
    return Corrupted(points=out, index=kept.index)


# name → (function of (points, beam, param, seed), parameter at severity 1, 2, 3)
Corruption = Callable[[np.ndarray, np.ndarray, object, int], Corrupted]
CORRUPTIONS: dict[str, tuple[Corruption, tuple[object, object, object]]] = {
    "beam_missing": (lambda p, b, f, s: beam_missing(p, b, f, s), (0.25, 0.5, 0.75)),
    "fewer_beams": (lambda p, b, k, s: fewer_beams(p, b, k), (2, 3, 4)),
    "cross_sensor": (lambda p, b, a, s: cross_sensor(p, b, a[0], a[1], s), ((2, 0.25), (2, 0.5), (4, 0.5))),
    "point_drop": (lambda p, b, f, s: drop_points(p, f, s), (0.25, 0.5, 0.75)),
    "jitter": (lambda p, b, sigma, s: jitter(p, sigma, s), (0.04, 0.08, 0.12)),
    "fog": (lambda p, b, beta, s: fog(p, beta, s), (0.005, 0.01, 0.02)),
}  # fmt: skip


def corrupt(
    name: str,
    points: np.ndarray,
    severity: int,
    seed: int,
    beam: np.ndarray | None = None,
    n_beams: int = 32,
) -> Corrupted:
    """Apply corruption ``name`` at ``severity`` (1..3); beams estimated if not given."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity}")
    fn, params = CORRUPTIONS[name]
    if beam is None:
        beam = elevation_beams(points[:, :3], n_beams)
    return fn(points, beam, params[severity - 1], seed)
