"""What every protocol shares: the evaluation data (reader, splits) and the backbone's features.

This is the one module of ``trainer/evaluate`` that talks to the student model (``trainer.model``)
and its input pipeline (``trainer.data``); the protocols see only ``point_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASETS = ("nuscenes", "semantickitti")


@dataclass(frozen=True)
class EvalData:
    """Which labelled scans an evaluation uses."""

    root: Path
    """Dataset root (nuScenes: the folder holding the version folder; SemanticKITTI: holds sequences/)."""
    dataset: str = "nuscenes"
    """"nuscenes" or "semantickitti"."""
    version: str | None = None
    """nuScenes version folder (v1.0-trainval, v1.0-mini, ...); None = the only one present."""
    train_split: str = "train"
    """Split the classifier is trained on."""
    val_split: str = "val"
    """Split the metrics are computed on."""
    max_train_scans: int | None = None
    """Use at most this many labelled training scans (evenly spaced over the split); None = all."""
    max_val_scans: int | None = None
    """Use at most this many labelled val scans (evenly spaced over the split); None = all."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        for name in ("max_train_scans", "max_val_scans"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 or None, got {value}")

    def train_scans(self, reader: Any) -> list:
        """Labelled scans of the training split."""
        return _labelled(reader, self.train_split, self.max_train_scans)

    def val_scans(self, reader: Any) -> list:
        """Labelled scans of the validation split."""
        return _labelled(reader, self.val_split, self.max_val_scans)


def _labelled(reader: Any, split: str, limit: int | None) -> list:
    scans = [s for s in reader.scans(split) if s.label_path is not None]
    if not scans:
        raise ValueError(f"split {split!r} of {reader.root} has no labelled scans")
    if limit is not None and len(scans) > limit:
        scans = [scans[i] for i in np.linspace(0, len(scans) - 1, limit).round().astype(int)]
    return scans


def open_reader(data: EvalData) -> Any:
    """The dataset reader (``pipeline.datasets``: pure readers of points and labels)."""
    if data.dataset == "semantickitti":
        from pipeline.datasets.semantickitti import SemanticKITTIReader

        return SemanticKITTIReader(data.root)
    from pipeline.datasets.nuscenes import NuScenesReader

    return NuScenesReader(data.root, data.version)


def load_model(
    checkpoint: str, like: Path | None, device: str, seed: int = 0
) -> tuple[torch.nn.Module, Any]:
    """(backbone in eval mode on ``device``, its model config).

    ``checkpoint`` is a run folder, or "none" for a random-initialised backbone with the
    architecture of run folder ``like`` (or the trainer's defaults without one).
    """
    raise NotImplementedError("lands with the trainer's model API")


@torch.no_grad()
def point_features(
    model: torch.nn.Module, model_cfg: Any, points: np.ndarray, device: str
) -> torch.Tensor:
    """(N, D) float32 backbone features of every input point (eval mode, no grad)."""
    raise NotImplementedError("lands with the trainer's model API")


def forward_points(
    model: torch.nn.Module, model_cfg: Any, batch: list[np.ndarray], device: str
) -> list[torch.Tensor]:
    """Per-scan (N_i, D) features of a batch of clouds, with grad (fine-tuning)."""
    raise NotImplementedError("lands with the trainer's model API")


def load_projection_head(checkpoint: str, device: str) -> torch.nn.Module | None:
    """The run's projection head (backbone features → teacher space), None if not stored."""
    raise NotImplementedError("lands with the trainer's model API")
