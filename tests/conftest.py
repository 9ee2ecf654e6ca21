"""Shared pytest fixtures (each helper only ADDS fixtures here)."""

from __future__ import annotations

from pathlib import Path

import pytest


# ---------------------------------------------------------------- teacher (pipeline/teacher.py) ----
@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a RANDOM tiny Dinov2Model (D=64, 2 layers, patch 14) saved with save_pretrained."""
    from pipeline.teacher import save_random_teacher

    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "tiny-dinov2", size="tiny")
