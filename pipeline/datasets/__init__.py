"""Dataset readers: plain records (``records.py``), nuScenes, SemanticKITTI, pre-flight checks."""

from pipeline.datasets.check import check_data, check_scan
from pipeline.datasets.nuscenes import NuScenesReader
from pipeline.datasets.records import (
    CAMERA_CHANNELS,
    IGNORE_LABEL,
    CameraFrame,
    DataError,
    Scan,
)

__all__ = [
    "CAMERA_CHANNELS",
    "IGNORE_LABEL",
    "CameraFrame",
    "DataError",
    "NuScenesReader",
    "Scan",
    "check_data",
    "check_scan",
]
