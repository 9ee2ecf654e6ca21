"""Plain, picklable records that every dataset reader returns (see docs/architecture.md).

Poses are 4x4 homogeneous matrices in float64; all images are addressed by absolute path, so a
record is self-contained and can be shipped to a Dask worker as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The six surround cameras of nuScenes, in the fixed order of ``Scan.cameras``
# (clockwise from the front, as the devkit lists them).
CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)

IGNORE_LABEL = 255  # label value for noise / unmapped / unlabelled points


class DataError(ValueError):
    """Bad or inconsistent input data. The message names the file or record and the problem."""


@dataclass(frozen=True)
class CameraFrame:
    channel: str  # "CAM_FRONT", ...
    image_path: str  # absolute path of the JPEG
    width: int
    height: int
    intrinsic: np.ndarray  # (3, 3) float64
    sensor_to_ego: np.ndarray  # (4, 4) float64, camera → ego, calibrated_sensor record
    ego_to_global: np.ndarray  # (4, 4) float64, ego pose at the camera timestamp
    timestamp: int  # µs


@dataclass(frozen=True)
class Scan:
    token: str  # sample token (the scan identity in the cache)
    lidar_token: str  # sample_data token of LIDAR_TOP
    lidar_path: str  # absolute path of the .pcd.bin
    sensor_to_ego: np.ndarray  # (4, 4) lidar → ego
    ego_to_global: np.ndarray  # (4, 4) ego pose at the lidar timestamp
    timestamp: int  # µs
    cameras: tuple[CameraFrame, ...]  # fixed order: CAMERA_CHANNELS
    label_path: str | None  # lidarseg .bin (or SemanticKITTI .label), None if unlabelled
    scene: str  # scene name
