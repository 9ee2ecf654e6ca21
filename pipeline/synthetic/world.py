"""Procedural street scene: a curved road with sidewalks, buildings, parked and stopped cars,
trucks, pedestrians, poles, trees, hedges, traffic cones and barriers, and the ego path.

Everything is static in the global frame, so every sensor sees the same geometry at any time.
Layout is done in road coordinates (s = arc length along the road centre line, d = lateral offset,
left positive); the centre line is a circular arc of curvature ``kappa`` (1/m), so the ego, driving
along the right lane, turns gently with yaw rate ``speed * kappa``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.synthetic import categories as C
from pipeline.synthetic.raycast import Primitive

ROAD_HALF_WIDTH = 6.0  # m: two 3.5 m lanes between parking strips, |d| < 6
SIDEWALK_OUTER = 9.0  # m: sidewalk for 6 <= |d| < 9, terrain beyond
LANE_OFFSET = 1.75  # m: centre of a driving lane from the road centre line
PARKING_OFFSET = 4.75  # m: centre of a parking strip


@dataclass(frozen=True)
class Road:
    """Centre line: an arc through ``origin`` with heading ``heading`` at s = 0."""

    origin: tuple[float, float]  # global (x, y) of the centre line at s = 0 (m)
    heading: float  # heading of the centre line at s = 0 (rad)
    kappa: float  # signed curvature (1/m), non-zero; > 0 turns left

    def center(self) -> np.ndarray:
        """Centre (2,) of the circle the road follows."""
        return (
            np.asarray(self.origin)
            + np.array([-np.sin(self.heading), np.cos(self.heading)]) / self.kappa
        )

    def heading_at(self, s: np.ndarray | float) -> np.ndarray:
        return self.heading + self.kappa * np.asarray(s, dtype=np.float64)

    def to_global(self, s: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        """Road coordinates → global (..., 2)."""
        th = self.heading_at(s)
        rad = 1.0 / self.kappa - np.asarray(d, dtype=np.float64)
        return self.center() + np.stack([rad * np.sin(th), -rad * np.cos(th)], axis=-1)

    def to_road(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global (N, 2) → (s (N,), d (N,)). s is unique within half a turn either side of s = 0."""
        rel = xy - self.center()
        r = np.hypot(rel[:, 0], rel[:, 1])
        d = 1.0 / self.kappa - np.sign(self.kappa) * r
        # angle of rel is heading - pi/2 (kappa > 0) or heading + pi/2 (kappa < 0)
        ang = np.arctan2(rel[:, 1], rel[:, 0]) + np.sign(self.kappa) * np.pi / 2
        dth = np.angle(np.exp(1j * (ang - self.heading)))
        return dth / self.kappa, d

    def ground_label(self, d: np.ndarray) -> np.ndarray:
        """Lidarseg class (N,) uint8 of the ground at lateral offsets d."""
        ad = np.abs(d)
        return np.where(
            ad < ROAD_HALF_WIDTH, C.DRIVEABLE, np.where(ad < SIDEWALK_OUTER, C.SIDEWALK, C.TERRAIN)
        ).astype(np.uint8)


@dataclass(frozen=True)
class EgoPath:
    """The ego drives the right lane (d = -LANE_OFFSET) at constant speed from s = 0 at ``t0_us``."""

    road: Road
    speed: float  # m/s along its lane
    t0_us: int  # timestamp (µs) at which the ego is at s = 0

    def pose(self, t_us: int) -> np.ndarray:
        """Ego → global (4, 4) at time t_us. The ego frame: x forward, y left, z up, on the ground."""
        d = -LANE_OFFSET
        # the lane is a concentric arc of radius 1/kappa - d: arc length along it grows slower/faster
        s = self.speed * (t_us - self.t0_us) * 1e-6 / (1.0 - self.road.kappa * d)
        xy = self.road.to_global(s, d)
        th = float(self.road.heading_at(s))
        pose = np.eye(4)
        pose[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
        pose[:2, 3] = xy
        return pose


@dataclass(frozen=True)
class WorldObject:
    """An annotated object (becomes a nuScenes instance + sample_annotations)."""

    category: str  # nuScenes category name, e.g. "vehicle.car"
    center: tuple[float, float, float]  # global box centre (m)
    size: tuple[float, float, float]  # (width, length, height) as in nuScenes
    yaw: float  # heading (rad)
    attribute: str | None  # nuScenes attribute name, or None


@dataclass(frozen=True)
class World:
    """All geometry of one scene."""

    road: Road
    primitives: list[Primitive]
    objects: list[WorldObject]
    sun: tuple[float, float, float]  # unit vector towards the sun (global)
    s_range: tuple[float, float]  # extent of the populated road (m)
    extra: dict = field(default_factory=dict)  # free-form scene facts (for docs/debug)


CAR_COLOURS = (
    (0.62, 0.05, 0.05),
    (0.08, 0.16, 0.48),
    (0.72, 0.73, 0.75),
    (0.05, 0.05, 0.06),
    (0.88, 0.88, 0.86),
    (0.25, 0.27, 0.3),
    (0.12, 0.35, 0.2),
)
FACADE_COLOURS = (
    (0.78, 0.7, 0.55),
    (0.62, 0.32, 0.24),
    (0.6, 0.6, 0.6),
    (0.85, 0.82, 0.75),
    (0.5, 0.42, 0.36),
)
SHIRT_COLOURS = (
    (0.8, 0.2, 0.2),
    (0.2, 0.4, 0.8),
    (0.9, 0.85, 0.3),
    (0.9, 0.9, 0.9),
    (0.3, 0.6, 0.3),
)


class _Builder:
    """Accumulates primitives and annotated objects while laying out the scene."""

    def __init__(self, road: Road, rng: np.random.Generator):
        self.road, self.rng = road, rng
        self.prims: list[Primitive] = []
        self.objects: list[WorldObject] = []

    def frame(self, s: float, d: float) -> tuple[float, float, float]:
        """Global (x, y) and the road heading at (s, d)."""
        x, y = self.road.to_global(s, d)
        return float(x), float(y), float(self.road.heading_at(s))

    def add_object(
        self, category: str, s: float, d: float, wlh, attribute: str | None, yaw_extra=0.0
    ):
        x, y, th = self.frame(s, d)
        w, ln, h = wlh
        self.objects.append(
            WorldObject(category, (x, y, h / 2), (w, ln, h), th + yaw_extra, attribute)
        )
        return len(self.objects) - 1, x, y, th + yaw_extra

    def box(self, x, y, z0, lwh, yaw, label, inst, colour, texture):
        ln, w, h = lwh
        self.prims.append(
            Primitive("box", (x, y, z0 + h / 2), (ln, w, h), yaw, label, inst, colour, texture)
        )

    def cylinder(self, x, y, z0, r, h, label, inst, colour, texture):
        self.prims.append(
            Primitive("cylinder", (x, y, z0), (r, r, h), 0.0, label, inst, colour, texture)
        )

    def sphere(self, x, y, z, r, label, inst, colour, texture):
        self.prims.append(
            Primitive("sphere", (x, y, z), (r, r, r), 0.0, label, inst, colour, texture)
        )

    # ---- objects -------------------------------------------------------------------------------

    def car(self, s: float, d: float, attribute: str, flip: bool) -> None:
        rng = self.rng
        ln, w, h = rng.uniform(3.9, 4.9), rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.7)
        inst, x, y, yaw = self.add_object(
            "vehicle.car", s, d, (w, ln, h), attribute, np.pi if flip else 0.0
        )
        colour = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
        body_h = 0.58 * h
        self.box(x, y, 0.0, (ln, w, body_h), yaw, C.CAR, inst, colour, "car_body")
        back = -0.08 * ln  # cabin sits slightly behind the middle
        cx, cy = x + back * np.cos(yaw), y + back * np.sin(yaw)
        self.box(
            cx, cy, body_h, (0.55 * ln, 0.88 * w, h - body_h), yaw, C.CAR, inst, colour, "car_cabin"
        )

    def truck(self, s: float, d: float, flip: bool) -> None:
        rng = self.rng
        ln, w, h = rng.uniform(6.5, 9.0), rng.uniform(2.3, 2.5), rng.uniform(2.9, 3.6)
        inst, x, y, yaw = self.add_object(
            "vehicle.truck", s, d, (w, ln, h), "vehicle.parked", np.pi if flip else 0.0
        )
        cab_l = 1.9
        fx, fy = np.cos(yaw), np.sin(yaw)
        cargo_c = -cab_l / 2 - 0.1
        self.box(
            x + cargo_c * fx,
            y + cargo_c * fy,
            0.0,
            (ln - cab_l - 0.2, w, h),
            yaw,
            C.TRUCK,
            inst,
            (0.9, 0.9, 0.88),
            "truck_cargo",
        )
        cab_c = ln / 2 - cab_l / 2
        colour = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
        self.box(
            x + cab_c * fx,
            y + cab_c * fy,
            0.0,
            (cab_l, w, 0.8 * h),
            yaw,
            C.TRUCK,
            inst,
            colour,
            "truck_cab",
        )

    def pedestrian(self, s: float, d: float) -> None:
        rng = self.rng
        r, h = rng.uniform(0.2, 0.26), rng.uniform(1.45, 1.62)
        head = rng.uniform(0.1, 0.12)
        inst, x, y, _ = self.add_object(
            "human.pedestrian.adult",
            s,
            d,
            (2 * r + 0.15, 2 * r + 0.1, h + 2 * head),
            "pedestrian.standing",
            rng.uniform(-np.pi, np.pi),
        )
        shirt = SHIRT_COLOURS[rng.integers(len(SHIRT_COLOURS))]
        self.cylinder(x, y, 0.0, r, h, C.PEDESTRIAN, inst, shirt, "person")
        self.sphere(x, y, h + head, head, C.PEDESTRIAN, inst, (0.85, 0.65, 0.5), "skin")

    def cone(self, s: float, d: float) -> None:
        inst, x, y, _ = self.add_object(
            "movable_object.trafficcone", s, d, (0.36, 0.36, 0.72), None
        )
        self.cylinder(x, y, 0.0, 0.17, 0.72, C.TRAFFIC_CONE, inst, (1.0, 0.42, 0.05), "cone")

    def barrier(self, s: float, d: float) -> None:
        ln = self.rng.uniform(1.8, 2.4)
        inst, x, y, yaw = self.add_object("movable_object.barrier", s, d, (0.45, ln, 1.0), None)
        self.box(x, y, 0.0, (ln, 0.45, 1.0), yaw, C.BARRIER, inst, (0.85, 0.1, 0.1), "barrier")

    def pole(self, s: float, d: float) -> None:
        x, y, _ = self.frame(s, d)
        h = self.rng.uniform(5.5, 8.0)
        self.cylinder(x, y, 0.0, 0.11, h, C.MANMADE, -1, (0.45, 0.47, 0.5), "metal")
        self.sphere(x, y, h + 0.2, 0.25, C.MANMADE, -1, (0.95, 0.95, 0.8), "metal")

    def tree(self, s: float, d: float) -> None:
        rng = self.rng
        x, y, _ = self.frame(s, d)
        trunk_h, crown = rng.uniform(2.4, 3.5), rng.uniform(1.4, 2.4)
        self.cylinder(
            x,
            y,
            0.0,
            rng.uniform(0.14, 0.25),
            trunk_h + 0.5 * crown,
            C.VEGETATION,
            -1,
            (0.35, 0.24, 0.14),
            "bark",
        )
        self.sphere(
            x, y, trunk_h + 0.8 * crown, crown, C.VEGETATION, -1, (0.16, 0.42, 0.12), "leaves"
        )

    def hedge(self, s: float, d: float, length: float) -> None:
        x, y, yaw = self.frame(s, d)
        h = self.rng.uniform(0.8, 1.3)
        self.box(x, y, 0.0, (length, 0.9, h), yaw, C.VEGETATION, -1, (0.12, 0.33, 0.1), "leaves")

    def building(self, s: float, d_front: float, side: float, length: float) -> None:
        rng = self.rng
        depth, h = rng.uniform(8.0, 18.0), rng.uniform(5.0, 24.0)
        x, y, yaw = self.frame(s, side * (d_front + depth / 2))
        colour = FACADE_COLOURS[rng.integers(len(FACADE_COLOURS))]
        self.box(x, y, 0.0, (length, depth, h), yaw, C.MANMADE, -1, colour, "facade")


def build_world(rng: np.random.Generator, ego_travel: float, origin: tuple[float, float]) -> World:
    """Lay out a street around an ego path of length ``ego_travel`` (m) starting at s = 0.

    The ego lane (right lane) is kept free over the ego path (plus margins), so no sensor is ever
    inside a solid.
    """
    kappa = float(rng.uniform(0.003, 0.012) * rng.choice([-1.0, 1.0]))
    road = Road(origin=origin, heading=float(rng.uniform(-np.pi, np.pi)), kappa=kappa)
    b = _Builder(road, rng)
    s0, s1 = -85.0, ego_travel + 85.0

    for side in (-1.0, 1.0):
        # buildings, with gaps holding hedges and trees on terrain
        s = s0 + rng.uniform(0, 10)
        while s < s1:
            length = rng.uniform(8.0, 26.0)
            if rng.random() < 0.8:
                b.building(s + length / 2, rng.uniform(10.5, 13.0), side, length)
            else:
                b.hedge(s + length / 2, side * 9.8, length)
            gap = rng.uniform(2.0, 12.0)
            if gap > 5.0:
                b.tree(s + length + gap / 2, side * 10.5)
            s += length + gap
        # poles along the curb
        s = s0 + rng.uniform(0, 15)
        while s < s1:
            b.pole(s, side * 6.4)
            s += rng.uniform(18.0, 30.0)
        # street trees in the outer sidewalk
        s = s0 + rng.uniform(0, 12)
        while s < s1:
            if rng.random() < 0.6:
                b.tree(s, side * 8.4)
            s += rng.uniform(9.0, 16.0)
        # pedestrians on the sidewalk
        s = s0 + rng.uniform(0, 8)
        while s < s1:
            b.pedestrian(s, side * rng.uniform(6.9, 7.7))
            s += rng.uniform(3.0, 14.0)
        # parking strip: parked cars, a truck now and then, one road-works zone per scene side
        works_at = (
            rng.uniform(5.0, ego_travel + 30.0)
            if side < 0
            else rng.uniform(-30.0, ego_travel + 30.0)
        )
        s = s0 + rng.uniform(0, 5)
        while s < s1:
            if abs(s - works_at) < 9.0:
                for k in range(5):
                    b.cone(s + 2.0 * k, side * (4.0 + 0.3 * k))
                b.barrier(s + 12.0, side * 4.9)
                s += 16.0
                continue
            r = rng.random()
            if r < 0.12:
                b.truck(s + 4.5, side * (PARKING_OFFSET + 0.2), flip=side > 0)
                s += 9.0 + rng.uniform(1.0, 4.0)
            elif r < 0.75:
                b.car(
                    s + 2.5,
                    side * PARKING_OFFSET,
                    "vehicle.parked",
                    flip=side > 0 and rng.random() < 0.8,
                )
                s += 5.0 + rng.uniform(0.8, 3.0)
            else:
                s += rng.uniform(4.0, 10.0)
    # stopped traffic: oncoming lane anywhere, the ego lane only well ahead of / behind the ego
    s = s0 + rng.uniform(0, 20)
    while s < s1:
        b.car(s, LANE_OFFSET, "vehicle.stopped", flip=True)
        s += rng.uniform(12.0, 35.0)
    for s in (ego_travel + rng.uniform(14.0, 25.0), rng.uniform(-25.0, -14.0)):
        b.car(s, -LANE_OFFSET, "vehicle.stopped", flip=False)

    sun_az, sun_el = rng.uniform(-np.pi, np.pi), rng.uniform(0.5, 1.1)
    sun = (np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el))
    return World(
        road=road,
        primitives=b.prims,
        objects=b.objects,
        sun=tuple(float(v) for v in sun),
        s_range=(s0, s1),
        extra={"kappa": kappa},
    )
