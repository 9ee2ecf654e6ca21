"""What a ray sees where it hits: class label, instance, normal, albedo (camera) and reflectivity
(LiDAR intensity). Every class has its own colour and texture so that image features carry class
information: asphalt with lane markings, tiled sidewalks, grass, facades with windows, cars with
glass cabins and dark wheels, striped cones and barriers, leafy vegetation, grey poles.
Textures are functions of the world position, so they are identical in every camera and time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synthetic import categories as C
from pipeline.synthetic.raycast import GROUND, Primitive, box_local, surface_normals
from pipeline.synthetic.world import ROAD_HALF_WIDTH, World

GLASS = np.array([0.1, 0.13, 0.19], dtype=np.float32)
TYRE = np.array([0.04, 0.04, 0.045], dtype=np.float32)


def _hash(ijk: np.ndarray) -> np.ndarray:
    """Integer lattice (N, 3) int64 → uniform [0, 1) float32, deterministic on every platform."""
    h = (ijk[:, 0] * 73856093) ^ (ijk[:, 1] * 19349663) ^ (ijk[:, 2] * 83492791)
    h = h.astype(np.uint64)
    h ^= h >> np.uint64(13)
    h *= np.uint64(0x5BD1E995)
    h ^= h >> np.uint64(15)
    return ((h & np.uint64(0xFFFFFF)).astype(np.float32)) / np.float32(1 << 24)


def cell_noise(p: np.ndarray, scale: float) -> np.ndarray:
    """Blocky noise: one random value per cube of side ``scale`` (m). p (N, 3) → (N,) in [0, 1)."""
    return _hash(np.floor(p / scale).astype(np.int64))


def value_noise(p: np.ndarray, scale: float, planar: bool = False) -> np.ndarray:
    """Smooth noise: trilinear interpolation of lattice values. p (N, 3) → (N,) in [0, 1).
    ``planar``: the points lie on z = 0 (bilinear in x, y: half the work)."""
    q = p / scale
    base = np.floor(q)
    f = (q - base).astype(np.float32)
    f = f * f * (3 - 2 * f)  # smoothstep
    base = base.astype(np.int64)
    out = np.zeros(len(p), dtype=np.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0,) if planar else (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                out += w * _hash(base + np.array([dx, dy, dz]))
    return out


@dataclass
class Surface:
    """Per-hit surface properties."""

    label: np.ndarray  # (N,) uint8 lidarseg index
    instance: np.ndarray  # (N,) int32 index into World.objects, -1 = none
    normal: np.ndarray  # (N, 3) float64 unit outward normal (global)
    albedo: np.ndarray  # (N, 3) float32 RGB in 0..1
    reflectivity: np.ndarray  # (N,) float32 in 0..1 (LiDAR)


def _ground(world: World, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground hits p (N, 3) → label, albedo, reflectivity."""
    s, d = world.road.to_road(p[:, :2])
    label = world.road.ground_label(d)
    ad = np.abs(d)
    n1, n2 = value_noise(p, 0.7, planar=True), cell_noise(p, 0.06)
    grey = np.empty(len(p), dtype=np.float32)
    albedo = np.empty((len(p), 3), dtype=np.float32)
    refl = np.empty(len(p), dtype=np.float32)

    road = label == C.DRIVEABLE
    grey[road] = 0.2 + 0.06 * n1[road] + 0.05 * n2[road]
    marking = road & (((ad < 0.08) & (np.mod(s, 6.0) < 3.0)) | (np.abs(ad - 3.5) < 0.07))
    albedo[road] = grey[road, None] * np.array([1.0, 1.0, 1.04], dtype=np.float32)
    albedo[marking] = (0.88, 0.88, 0.82)
    refl[road] = 0.08 + 0.04 * n2[road]
    refl[marking] = 0.6

    walk = label == C.SIDEWALK
    seam = (np.mod(s, 0.8) < 0.04) | (np.mod(ad - ROAD_HALF_WIDTH, 0.8) < 0.04)
    curb = ad < ROAD_HALF_WIDTH + 0.25
    g = 0.6 + 0.08 * n1 + 0.04 * n2
    g = np.where(seam, 0.42, g)
    g = np.where(curb, 0.75, g)
    albedo[walk] = g[walk, None] * np.array([1.0, 0.98, 0.94], dtype=np.float32)
    refl[walk] = 0.25 + 0.05 * n2[walk]

    grass = label == C.TERRAIN
    k = (0.7 + 0.5 * n1 + 0.3 * n2)[grass, None]
    albedo[grass] = k * np.array([0.22, 0.4, 0.12], dtype=np.float32)
    refl[grass] = 0.15 + 0.1 * n2[grass]
    return label, albedo, refl


def _primitive(prim: Primitive, p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hits p (N, 3) with normals n (N, 3) on ``prim`` → albedo (N, 3), reflectivity (N,)."""
    base = np.asarray(prim.colour, dtype=np.float32)
    albedo = np.tile(base, (len(p), 1))
    refl = np.full(len(p), 0.3, dtype=np.float32)
    z = p[:, 2] - (prim.center[2] - prim.size[2] / 2 if prim.kind == "box" else prim.center[2])
    tex = prim.texture
    if prim.kind == "box":
        local = box_local(p - np.asarray(prim.center), prim.yaw)
        n_local = box_local(n, prim.yaw)
        u = np.where(np.abs(n_local[:, 0]) > 0.5, local[:, 1], local[:, 0])  # along the face
        top = n_local[:, 2] > 0.5
    if tex == "facade":
        zz = p[:, 2]
        uu = np.mod(u + 50.0, 3.0)
        window = (
            (uu > 0.8) & (uu < 2.2) & (np.mod(zz, 3.2) > 1.0) & (np.mod(zz, 3.2) < 2.4) & (zz > 2.5)
        )
        albedo *= (0.85 + 0.25 * value_noise(p, 1.5))[:, None]
        albedo[window] = GLASS
        albedo[top] = (0.28, 0.28, 0.3)
        refl[:] = 0.35
        refl[window] = 0.1
    elif tex == "car_body":
        half_l = prim.size[0] / 2
        wheel = (z < 0.5) & (np.abs(np.abs(local[:, 0]) - 0.68 * half_l) < 0.35) & ~top
        bumper = z < 0.25
        albedo[bumper] = (0.12, 0.12, 0.13)
        albedo[wheel] = TYRE
        refl[:] = 0.45
        refl[wheel] = 0.05
    elif tex == "car_cabin":
        pillar = np.abs(local[:, 0]) > prim.size[0] / 2 - 0.12
        glass = ~top & ~pillar
        albedo[glass] = GLASS
        refl[glass] = 0.08
    elif tex == "truck_cargo":
        albedo *= (0.9 + 0.1 * (np.mod(u + 50.0, 0.6) < 0.05))[:, None]
        refl[:] = 0.5
    elif tex == "truck_cab":
        glass = (z > 0.55 * prim.size[2]) & ~top
        albedo[glass] = GLASS
        refl[glass] = 0.08
    elif tex == "person":
        legs = z < 0.45 * prim.size[2]
        albedo[legs] = (0.12, 0.12, 0.2)
        refl[:] = 0.2
    elif tex == "cone":
        band = (z > 0.3) & (z < 0.48)
        albedo[band] = (0.95, 0.95, 0.95)
        refl[:] = 0.9
    elif tex == "barrier":
        stripe = np.mod(u + z + 50.0, 0.5) < 0.25
        albedo[stripe] = (0.95, 0.95, 0.95)
        refl[:] = 0.75
    elif tex == "metal":
        refl[:] = 0.55
    elif tex == "bark":
        albedo *= (0.7 + 0.5 * cell_noise(p, 0.05))[:, None]
        refl[:] = 0.2
    elif tex == "leaves":
        albedo *= (0.5 + 0.6 * value_noise(p, 0.35) + 0.4 * cell_noise(p, 0.08))[:, None]
        refl[:] = 0.18 + 0.1 * cell_noise(p, 0.1)
    elif tex == "skin":
        refl[:] = 0.25
    else:
        raise ValueError(f"unknown texture {tex!r}")
    return np.clip(albedo, 0.0, 1.0), refl


def describe(
    world: World, origin: np.ndarray, dirs: np.ndarray, t: np.ndarray, prim: np.ndarray
) -> Surface:
    """Surface at the hits of rays ``dirs`` (N, 3) from ``origin`` at distance t (N,) on primitive
    ``prim`` (N,) (every ray must hit: prim >= GROUND)."""
    n_hits = len(t)
    p = origin + t[:, None] * dirs  # (N, 3)
    label = np.empty(n_hits, dtype=np.uint8)
    instance = np.full(n_hits, -1, dtype=np.int32)
    normal = np.zeros((n_hits, 3))
    albedo = np.empty((n_hits, 3), dtype=np.float32)
    refl = np.empty(n_hits, dtype=np.float32)

    g = prim == GROUND
    p[g, 2] = 0.0  # exactly on the plane, so textures agree between views
    normal[g] = (0.0, 0.0, 1.0)
    label[g], albedo[g], refl[g] = _ground(world, p[g])

    order = np.argsort(prim, kind="stable")
    ids, starts = np.unique(prim[order], return_index=True)
    bounds = np.append(starts, n_hits)
    for k, pid in enumerate(ids):
        if pid < 0:
            continue
        rows = order[bounds[k] : bounds[k + 1]]
        pr = world.primitives[pid]
        n = surface_normals(pr, p[rows])
        normal[rows] = n
        label[rows] = pr.label
        instance[rows] = pr.instance
        albedo[rows], refl[rows] = _primitive(pr, p[rows], n)
    return Surface(label, instance, normal, albedo, refl)
