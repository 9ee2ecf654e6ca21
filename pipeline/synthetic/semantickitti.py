"""A small synthetic dataset in the SemanticKITTI layout (for tests and the demo).

A straight street (road, sidewalks, terrain) lined with buildings, parked and moving cars, poles
and trees, all axis-aligned boxes, scanned by a simulated spinning lidar (``beams`` rings between
+2° and −24.8° elevation like the HDL-64E, ``azimuth_steps`` rays a ring) from a car driving along
+x. Every ray is intersected with the ground plane and every box; the nearest hit within
``max_range`` is a point. Labels carry raw SemanticKITTI ids (moving cars use 252) and an instance
id in the upper 16 bits. Calibration uses the real KITTI axis convention (Tr: velodyne x-forward /
z-up → camera z-forward / y-down), poses are camera-0 poses, so the reader's pose chain is tested
for real. No images are written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.outputs import check_parents

SENSOR_HEIGHT = 1.73  # m, lidar above the ground as on the KITTI car

# Raw SemanticKITTI ids used by the scene.
ROAD, SIDEWALK, TERRAIN, BUILDING, CAR, MOVING_CAR, POLE, TRUNK, VEGETATION, FENCE = (
    40, 48, 72, 50, 10, 252, 80, 71, 70, 51,
)  # fmt: skip
_INTENSITY = {ROAD: 0.15, SIDEWALK: 0.3, TERRAIN: 0.45, BUILDING: 0.6, CAR: 0.8, MOVING_CAR: 0.8,
              POLE: 0.5, TRUNK: 0.35, VEGETATION: 0.25, FENCE: 0.55}  # fmt: skip

# The real KITTI velodyne → camera-0 rotation (x fwd, y left, z up → x right, y down, z fwd).
_TR = np.array(
    [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.08], [1.0, 0.0, 0.0, -0.27], [0.0, 0.0, 0.0, 1.0]]
)
_P = np.array([[718.856, 0.0, 607.1928, 0.0], [0.0, 718.856, 185.2157, 0.0], [0.0, 0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class SyntheticKittiConfig:
    """What the synthetic SemanticKITTI set looks like."""

    sequences: tuple[str, ...] = ("00", "08")
    """Sequence folders to write ("00" is in the train split, "08" is val)."""
    frames_per_sequence: int = 3
    """Scans per sequence."""
    beams: int = 32
    """Lidar rings (64 on the real HDL-64E; fewer keeps tests fast)."""
    azimuth_steps: int = 360
    """Rays per ring."""
    max_range: float = 50.0
    """Farthest return, m."""
    step: float = 1.5
    """Distance driven between scans, m."""
    seed: int = 0
    """Seed of the scene layout and the range noise."""

    def __post_init__(self) -> None:
        if self.frames_per_sequence < 1 or self.beams < 1 or self.azimuth_steps < 1:
            raise ValueError("frames_per_sequence, beams and azimuth_steps must be ≥ 1")


def make_scene(rng: np.random.Generator, length: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a street scene: (K, 2, 3) float64 [min corner, max corner] and (K,) raw labels."""
    boxes: list[tuple[list[float], list[float], int]] = []
    x = -20.0
    while x < length:  # buildings on both sides, random widths and heights
        w = rng.uniform(8, 16)
        for side in (-1, 1):
            y0 = side * rng.uniform(9.0, 11.0)
            y1 = y0 + side * rng.uniform(6, 10)
            boxes.append(
                ([x, min(y0, y1), 0.0], [x + w, max(y0, y1), rng.uniform(5, 14)], BUILDING)
            )
        x += w + rng.uniform(2, 5)
    for x in np.arange(-10.0, length, 12.0):  # poles and trees on the sidewalks
        for side in (-1, 1):
            y = side * 5.8
            boxes.append(([x - 0.1, y - 0.1, 0.0], [x + 0.1, y + 0.1, 5.0], POLE))
            tx = x + 6.0
            boxes.append(([tx - 0.2, y - 0.2, 0.0], [tx + 0.2, y + 0.2, 2.5], TRUNK))
            boxes.append(([tx - 1.5, y - 1.5, 2.5], [tx + 1.5, y + 1.5, 5.0], VEGETATION))
    for side in (-1, 1):  # a fence behind the sidewalk at the far end
        boxes.append(([60.0, side * 7.0 - 0.05, 0.0], [90.0, side * 7.0 + 0.05, 1.2], FENCE))
    for x in rng.uniform(0, length, size=10):  # parked cars (right lane edge) and moving cars
        side = rng.choice([-1, 1])
        y = side * 2.6
        label = CAR if rng.random() < 0.6 else MOVING_CAR
        boxes.append(([x - 2.2, y - 0.9, 0.0], [x + 2.2, y + 0.9, 1.5], label))
    corners = np.array([[b[0], b[1]] for b in boxes], dtype=np.float64)  # (K, 2, 3)
    labels = np.array([b[2] for b in boxes], dtype=np.uint32)  # (K,)
    return corners, labels


def ground_label(xy: np.ndarray) -> np.ndarray:
    """Raw label of ground points by lateral offset: road |y|<4, sidewalk <6.5, terrain beyond."""
    ay = np.abs(xy[:, 1])
    return np.where(ay < 4.0, ROAD, np.where(ay < 6.5, SIDEWALK, TERRAIN)).astype(np.uint32)


def lidar_rays(beams: int, azimuth_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (R, 3) and their ring index (R,) of a spinning lidar."""
    elevation = np.deg2rad(np.linspace(2.0, -24.8, beams))  # ring 0 = top
    azimuth = np.linspace(-np.pi, np.pi, azimuth_steps, endpoint=False)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")  # (B, A)
    dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
    ring = np.repeat(np.arange(beams), azimuth_steps)
    return dirs.reshape(-1, 3), ring


def cast(
    origin: np.ndarray,
    dirs: np.ndarray,
    boxes: np.ndarray,
    box_labels: np.ndarray,
    max_range: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of each ray: distance (R,), raw label (R,), box index (R,) (-1 = ground/none).

    Slab test against every box and the plane z = 0; distance is inf where nothing is hit.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs  # (R, 3)
        t0 = (boxes[None, :, 0, :] - origin) * inv[:, None, :]  # (R, K, 3)
        t1 = (boxes[None, :, 1, :] - origin) * inv[:, None, :]
    t_near = np.nanmax(np.minimum(t0, t1), axis=2)  # (R, K)
    t_far = np.nanmin(np.maximum(t0, t1), axis=2)
    hit = (t_near <= t_far) & (t_far > 0) & (t_near > 0)
    t_box = np.where(hit, t_near, np.inf)
    box_idx = np.argmin(t_box, axis=1)  # (R,)
    t_best = t_box[np.arange(len(dirs)), box_idx]
    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)  # (R,)
    ground_first = t_ground < t_best
    dist = np.where(ground_first, t_ground, t_best)
    ground_xy = origin[:2] + dirs[:, :2] * np.where(np.isfinite(t_ground), t_ground, 0.0)[:, None]
    labels = np.where(ground_first, ground_label(ground_xy), box_labels[box_idx])
    box_idx = np.where(ground_first, -1, box_idx)
    dist = np.where(dist <= max_range, dist, np.inf)
    return dist, labels.astype(np.uint32), box_idx


def kitti_sequences(n: int) -> tuple[str, ...]:
    """``n`` sequence names: the first n - 1 training sequences and the val sequence 08
    (n = 1: only "00")."""
    if n < 1:
        raise ValueError(f"need at least one sequence, got {n}")
    train = ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10")
    if n - 1 > len(train):
        raise ValueError(f"at most {len(train) + 1} sequences (00-10), got {n}")
    return ("00",) if n == 1 else (*train[: n - 1], "08")


def write_synthetic_semantickitti(
    out: str | Path, cfg: SyntheticKittiConfig | None = None, overwrite: bool = False
) -> Path:
    """Write the synthetic set under ``out`` (which then holds ``sequences/``); returns ``out``.

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a complete-looking dataset. ``out`` must not exist or be empty unless
    ``overwrite`` (then the old folder is replaced once the new one is complete).
    """
    cfg = cfg or SyntheticKittiConfig()
    out = Path(out)
    check_parents(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (--overwrite replaces it)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs, _ring = lidar_rays(cfg.beams, cfg.azimuth_steps)
    tr_inv = np.linalg.inv(_TR)
    for s, seq in enumerate(cfg.sequences):
        rng = np.random.default_rng([cfg.seed, s])
        boxes, box_labels = make_scene(rng)
        seq_dir = tmp / "sequences" / seq
        (seq_dir / "velodyne").mkdir(parents=True)
        (seq_dir / "labels").mkdir()
        poses, times = [], []
        for f in range(cfg.frames_per_sequence):
            origin = np.array([f * cfg.step, 0.0, SENSOR_HEIGHT])
            dist, raw, box_idx = cast(origin, dirs, boxes, box_labels, cfg.max_range)
            keep = np.isfinite(dist)
            d = dist[keep] + rng.normal(0.0, 0.01, keep.sum())  # 1 cm range noise
            xyz = dirs[keep] * d[:, None]  # (N, 3) lidar frame (no rotation: driving along +x)
            sem = raw[keep]
            intensity = np.array([_INTENSITY[int(v)] for v in sem], dtype=np.float64)
            intensity = np.clip(intensity + rng.normal(0, 0.03, len(sem)), 0, 1)
            points = np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32)
            instance = np.where(box_idx[keep] >= 0, box_idx[keep] + 1, 0).astype(np.uint32)
            instance = np.where(np.isin(sem, [CAR, MOVING_CAR]), instance, 0)
            points.tofile(seq_dir / "velodyne" / f"{f:06d}.bin")
            ((instance << 16) | sem).astype(np.uint32).tofile(seq_dir / "labels" / f"{f:06d}.label")
            lidar_pose = np.eye(4)  # lidar(f) → lidar(0)
            lidar_pose[0, 3] = f * cfg.step
            poses.append((_TR @ lidar_pose @ tr_inv)[:3].reshape(-1))
            times.append(f * 0.1)
        calib = [f"P{i}: " + " ".join(f"{v:.12e}" for v in _P.reshape(-1)) for i in range(4)]
        calib.append("Tr: " + " ".join(f"{v:.12e}" for v in _TR[:3].reshape(-1)))
        (seq_dir / "calib.txt").write_text("\n".join(calib) + "\n")
        np.savetxt(seq_dir / "poses.txt", np.array(poses), fmt="%.12e")
        np.savetxt(seq_dir / "times.txt", np.array(times), fmt="%.6e")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out
