"""Pre-flight checks of a dataset: find broken files before a long extraction starts.

``check_scan`` works on any reader's ``Scan`` records: it reads the points (size and NaN/Inf), the
label file size (``reader.label_bytes_per_point`` bytes a point: 1 for nuScenes' uint8 lidarseg,
4 for SemanticKITTI's uint32) and values (``reader.load_labels``), the calibration matrices, and
each image's header (format and size; the pixels are decoded only at extraction time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.datasets.records import DataError, Scan
from pipeline.geometry import check_intrinsic

_ROTATION_TOLERANCE = 1e-6


class Reader(Protocol):
    label_bytes_per_point: int

    def scans(self, split: str) -> list[Scan]: ...
    def load_points(self, scan: Scan) -> np.ndarray: ...
    def load_labels(self, scan: Scan) -> np.ndarray: ...
    def load_rings(self, scan: Scan) -> np.ndarray | None: ...


def _rigid_problem(transform: np.ndarray) -> str | None:
    """Why a (4, 4) matrix is not a rigid transform, or None."""
    if transform.shape != (4, 4) or not np.all(np.isfinite(transform)):
        return "not a finite 4x4 matrix"
    rotation = transform[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=_ROTATION_TOLERANCE):
        return "rotation is not orthonormal"
    if not np.allclose(transform[3], (0, 0, 0, 1)):
        return "last row is not (0, 0, 0, 1)"
    return None


def check_scan(reader: Reader, scan: Scan) -> list[str]:
    """Problems of one scan, each a line naming the file or record; [] when it is fine."""
    problems: list[str] = []
    try:
        n_points = len(reader.load_points(scan))
    except (DataError, OSError) as e:  # a reader may raise FileNotFoundError for a missing file
        problems.append(str(e))
        n_points = None
    if scan.label_path is not None:
        label_path = Path(scan.label_path)
        if not label_path.is_file():
            problems.append(f"{label_path}: label file missing (scan {scan.token})")
        elif n_points is not None:
            size = label_path.stat().st_size
            if size != n_points * reader.label_bytes_per_point:
                problems.append(
                    f"{label_path}: {size} bytes of labels for {n_points} points, expected "
                    f"{n_points * reader.label_bytes_per_point} (scan {scan.token})"
                )
            else:
                try:  # the values: each must map to a class or ignore
                    reader.load_labels(scan)
                except (DataError, OSError) as e:
                    problems.append(f"{e} (scan {scan.token})")
    for name, transform in (
        ("lidar sensor_to_ego", scan.sensor_to_ego),
        ("lidar ego_to_global", scan.ego_to_global),
    ):
        if (why := _rigid_problem(transform)) is not None:
            problems.append(f"scan {scan.token}: {name} {why}")
    for camera in scan.cameras:
        where = f"scan {scan.token} {camera.channel}"
        for name, transform in (
            ("sensor_to_ego", camera.sensor_to_ego),
            ("ego_to_global", camera.ego_to_global),
        ):
            if (why := _rigid_problem(transform)) is not None:
                problems.append(f"{where}: {name} {why}")
        try:
            check_intrinsic(camera.intrinsic)
        except ValueError as e:
            problems.append(f"{where}: {e}")
        try:
            with Image.open(camera.image_path) as image:
                size = image.size
        except FileNotFoundError:
            problems.append(f"{camera.image_path}: image file missing ({where})")
            continue
        except OSError as e:
            problems.append(f"{camera.image_path}: cannot decode image header ({e})")
            continue
        if size != (camera.width, camera.height):
            problems.append(
                f"{camera.image_path}: image is {size[0]}x{size[1]}, the record says "
                f"{camera.width}x{camera.height}"
            )
    return problems


def check_data(reader: Reader, split: str) -> list[str]:
    """All problems of a split (record-level errors first stop the listing: they are reported
    as the single problem). Shows a progress bar over scans."""
    try:
        scans = reader.scans(split)
    except (ValueError, OSError) as e:  # DataError, or a reader's unknown split / missing folder
        return [str(e)]
    if not scans:
        return [f"split {split!r} has no scans (does it belong to another version?)"]
    problems: list[str] = []
    for scan in tqdm(scans, desc=f"check {split}", unit="scan"):
        problems.extend(check_scan(reader, scan))
    return problems
