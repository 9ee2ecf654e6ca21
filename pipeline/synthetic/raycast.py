"""Analytic ray casting of simple primitives, vectorised over rays.

All rays of one sensor frame share one origin (the sensor centre) and have unit directions, so the
returned ``t`` is the metric distance along the ray. A miss is ``inf``. Primitives are tested only
against the rays of the sensor grid cells their bounding sphere can cover (the ``regions`` callback
of :func:`cast`): a camera passes the pixel rectangle the sphere projects into, the LiDAR the
(ring, azimuth) window. This keeps a 640x360 frame with ~200 primitives well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-6  # rays start this far (m) in front of the origin
GROUND = -1  # ``prim`` value of a ground hit
NOTHING = -2  # ``prim`` value of a ray that hits nothing (sky)


@dataclass(frozen=True)
class Primitive:
    """One solid of the world, with what a ray hitting it sees and labels."""

    kind: str  # "box" (yawed, axis-aligned in z), "cylinder" (vertical) or "sphere"
    center: tuple[
        float, float, float
    ]  # box/sphere: centre; cylinder: centre of its base (global m)
    size: tuple[
        float, float, float
    ]  # box: (length, width, height); cylinder: (r, r, height); sphere: (r, r, r)
    yaw: float  # box heading (rad) about +z; 0 for the others
    label: int  # nuScenes-lidarseg class index
    instance: int  # index into World.objects, -1 = not an annotated object
    colour: tuple[float, float, float]  # base albedo, RGB in 0..1
    texture: str  # shading pattern, see pipeline/synthetic/surface.py

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        """Centre (3,) and radius of a sphere that contains the primitive."""
        c = np.asarray(self.center, dtype=np.float64)
        if self.kind == "box":
            return c, 0.5 * float(np.linalg.norm(self.size))
        if self.kind == "cylinder":
            r, _, h = self.size
            return c + np.array([0.0, 0.0, h / 2]), float(np.hypot(r, h / 2))
        return c, float(self.size[0])


def box_local(v: np.ndarray, yaw: float) -> np.ndarray:
    """Rotate vectors (N, 3) from the global frame into the frame of a box with heading ``yaw``."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * v[:, 0] + s * v[:, 1], -s * v[:, 0] + c * v[:, 1], v[:, 2]], axis=1)


Dirs = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, z components of unit directions, any shape


def intersect_box(
    origin: np.ndarray, dirs: Dirs, center: np.ndarray, size: np.ndarray, yaw: float
) -> np.ndarray:
    """Slab test. origin (3,), dirs components (...) → t (...), inf where missed."""
    c, s = float(np.cos(yaw)), float(np.sin(yaw))
    rx, ry, rz = (float(v) for v in origin - center)
    o = (c * rx + s * ry, -s * rx + c * ry, rz)  # origin in the box frame
    d = (c * dirs[0] + s * dirs[1], -s * dirs[0] + c * dirs[1], dirs[2])
    t_near, t_far = -np.inf, np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        for o_a, d_a, h_a in zip(o, d, (0.5 * float(v) for v in size), strict=True):
            inv = 1.0 / d_a
            t1 = (-h_a - o_a) * inv
            t2 = (h_a - o_a) * inv
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
        hit = (t_near <= t_far) & (t_near > EPS)
    return np.where(hit, t_near, np.inf)


def intersect_cylinder(
    origin: np.ndarray, dirs: Dirs, base: np.ndarray, radius: float, height: float
) -> np.ndarray:
    """Vertical cylinder with a top cap (its base stands on something). → t (...), inf = miss."""
    ox, oy, oz = (float(v) for v in origin - base)
    dx, dy, dz = dirs
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    cross = ox * dy - oy * dx
    disc = a * (radius * radius) - cross * cross  # = b^2 - a (|o|^2 - r^2), without cancellation
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
        z = oz + t_side * dz
        side_ok = (disc >= 0) & (a > 0) & (t_side > EPS) & (z >= 0) & (z <= height)
        t = np.where(side_ok, t_side, np.inf)
        if oz > height:  # the top cap is visible only from above
            t_top = (height - oz) / dz
            rx, ry = ox + t_top * dx, oy + t_top * dy
            top_ok = (dz < 0) & (t_top > EPS) & (rx * rx + ry * ry <= radius * radius)
            t = np.minimum(t, np.where(top_ok, t_top, np.inf))
    return t


def intersect_sphere(
    origin: np.ndarray, dirs: Dirs, center: np.ndarray, radius: float
) -> np.ndarray:
    """→ t (...) of the near intersection, inf = miss."""
    ox, oy, oz = (float(v) for v in origin - center)
    dx, dy, dz = dirs
    b = dx * ox + dy * oy + dz * oz
    cx, cy, cz = (
        oy * dz - oz * dy,
        oz * dx - ox * dz,
        ox * dy - oy * dx,
    )  # |o x d| = ray-centre distance
    disc = radius * radius - (cx * cx + cy * cy + cz * cz)  # = b^2 - (|o|^2 - r^2) for unit d
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    return np.where((disc >= 0) & (t > EPS), t, np.inf)


def intersect_ground(origin: np.ndarray, dirs: Dirs) -> np.ndarray:
    """The plane z = 0, seen from above. → t (...), inf = miss."""
    with np.errstate(divide="ignore"):
        t = -float(origin[2]) / dirs[2]
    return np.where((dirs[2] < 0) & (t > EPS), t, np.inf)


def intersect(prim: Primitive, origin: np.ndarray, dirs: Dirs) -> np.ndarray:
    """Dispatch on ``prim.kind``. origin (3,), dirs components (...) → t (...)."""
    center = np.asarray(prim.center, dtype=np.float64)
    if prim.kind == "box":
        return intersect_box(origin, dirs, center, np.asarray(prim.size, np.float64), prim.yaw)
    if prim.kind == "cylinder":
        return intersect_cylinder(origin, dirs, center, prim.size[0], prim.size[2])
    if prim.kind == "sphere":
        return intersect_sphere(origin, dirs, center, prim.size[0])
    raise ValueError(f"unknown primitive kind {prim.kind!r}")


def surface_normals(prim: Primitive, points: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) at points (N, 3) on the surface of ``prim``."""
    center = np.asarray(prim.center, dtype=np.float64)
    if prim.kind == "box":
        local = box_local(points - center, prim.yaw)
        half = 0.5 * np.asarray(prim.size)
        axis = np.argmax(np.abs(local) / half, axis=1)
        n_local = np.zeros_like(local)
        rows = np.arange(len(points))
        n_local[rows, axis] = np.sign(local[rows, axis])
        c, s = np.cos(prim.yaw), np.sin(prim.yaw)
        return np.stack(
            [
                c * n_local[:, 0] - s * n_local[:, 1],
                s * n_local[:, 0] + c * n_local[:, 1],
                n_local[:, 2],
            ],
            axis=1,
        )
    if prim.kind == "cylinder":
        radial = points - center
        radial[:, 2] = 0.0
        r = np.linalg.norm(radial, axis=1, keepdims=True)
        on_top = (points[:, 2] >= center[2] + prim.size[2] - 1e-5) & (r[:, 0] < prim.size[0] - 1e-5)
        n = radial / np.maximum(r, 1e-9)
        n[on_top] = (0.0, 0.0, 1.0)
        return n
    return (points - center) / prim.size[0]


Region = tuple[slice, slice]


@dataclass
class Hits:
    """Nearest surface along each ray of a sensor grid."""

    t: np.ndarray  # (H, W) float64 distance (m), inf = nothing
    prim: np.ndarray  # (H, W) int32 primitive index, GROUND or NOTHING


def cast(
    origin: np.ndarray,
    dirs: np.ndarray,
    prims: list[Primitive],
    regions: Callable[[np.ndarray, float], list[Region]],
) -> Hits:
    """Nearest hit of every ray of the grid ``dirs`` (H, W, 3) from ``origin`` (3,).

    ``regions(center, radius)`` returns the grid windows whose rays may hit a bounding sphere.
    """
    h, w, _ = dirs.shape
    planes = tuple(np.ascontiguousarray(dirs[..., a]) for a in range(3))  # 3 x (H, W)
    t = intersect_ground(origin, planes)
    prim_idx = np.where(np.isfinite(t), GROUND, NOTHING).astype(np.int32)
    for i, prim in enumerate(prims):
        center, radius = prim.bounding_sphere()
        for rows, cols in regions(center, radius):
            sub = tuple(p[rows, cols] for p in planes)  # views (h', w')
            if sub[0].size == 0:
                continue
            t_p = intersect(prim, origin, sub)
            t_sub = t[rows, cols]
            nearer = t_p < t_sub
            if nearer.any():
                t_sub[nearer] = t_p[nearer]  # views: writes into t / prim_idx
                prim_idx[rows, cols][nearer] = i
    return Hits(t=t, prim=prim_idx)
