"""Shared pytest fixtures (each helper only ADDS fixtures here)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest


# ---------------------------------------------------------------- teacher (pipeline/teacher.py) ----
@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a RANDOM tiny Dinov2Model (D=64, 2 layers, patch 14) saved with save_pretrained."""
    from pipeline.teacher import save_random_teacher

    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "tiny-dinov2", size="tiny")


# ---------------------------------------------------------------- SemanticKITTI (evaluation) ----
@pytest.fixture(scope="session")
def synthetic_semantickitti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny synthetic SemanticKITTI set: sequences 00, 03 (train) and 08 (val), 2 scans
    each, 16 beams x 180 azimuth steps (~2.5k points a scan)."""
    from pipeline.synthetic.semantickitti import SyntheticKittiConfig, write_synthetic_semantickitti

    cfg = SyntheticKittiConfig(
        sequences=("00", "03", "08"), frames_per_sequence=2, beams=16, azimuth_steps=180
    )
    return write_synthetic_semantickitti(tmp_path_factory.mktemp("kitti") / "semantickitti", cfg)


# ---------------------------------------------------------------- synthetic nuScenes (pipeline/synthetic) ----
class SyntheticNuScenes(NamedTuple):
    """A generated nuScenes-lidarseg release; unpacks as ``root, version = synthetic_nuscenes``."""

    root: Path  # the dataroot (holds v1.0-synthetic/, samples/, lidarseg/, maps/, synthetic_semantic/)
    version: str  # "v1.0-synthetic"


@pytest.fixture(scope="session")
def synthetic_nuscenes(tmp_path_factory: pytest.TempPathFactory) -> SyntheticNuScenes:
    """The demo synthetic nuScenes set (seed 0): scenes scene-0001 and scene-0002, 4 keyframes each,
    6 cameras at 640x360, ~30k LiDAR points a sweep, lidarseg labels. Generated once per session."""
    from pipeline.synthetic import VERSION, SyntheticConfig, make_synthetic

    root = make_synthetic(SyntheticConfig(out=tmp_path_factory.mktemp("nuscenes") / "synthetic"))
    return SyntheticNuScenes(root=root, version=VERSION)
