"""Linear-probe protocol: frozen backbone, one linear layer per point, mIoU on the val split.

1. Backbone from a run folder (or random-initialised, same architecture: ``--checkpoint none``).
2. Point features of every training scan computed once (no grad, eval mode) and kept in memory as
   float16, optionally subsampled to ``points_per_scan`` points a scan.
3. A linear layer features → classes fitted with cross-entropy (``trainer/evaluate/probe.py``).
4. Val scans are streamed: features → prediction → one confusion matrix over the split → IoUs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trainer.evaluate.backbone import (
    EvalData,
    checkpoint_record,
    load_model,
    needs_out,
    open_reader,
    scan_features,
)
from trainer.evaluate.metrics import iou_per_class, iou_table, mean_iou
from trainer.evaluate.probe import ProbeConfig, fit_linear_probe, probe_confusion


@dataclass(frozen=True)
class LinearProbeConfig:
    """A linear-probe evaluation."""

    checkpoint: str
    """Run folder of the pretrained student, or "none" for a random-initialised backbone."""
    data: EvalData
    """Dataset, splits and scan limits."""
    out: Path | None = None
    """Where results go; default RUN_DIR/eval (required with checkpoint "none")."""
    like: Path | None = None
    """With checkpoint "none": take the architecture from this run folder (default: trainer defaults)."""
    probe: ProbeConfig = ProbeConfig()
    """How the linear layer is fitted."""
    points_per_scan: int | None = 2_000
    """Training points kept per scan (seeded random subset; None = all): bounds the memory."""
    device: str = "cpu"
    """torch device."""
    seed: int = 0
    """Seed of the random initialisation ("none") and of the point subsampling."""

    def __post_init__(self) -> None:
        if self.out is None and (why := needs_out(self.checkpoint)):
            raise ValueError(why)
        if self.points_per_scan is not None and self.points_per_scan < 1:
            raise ValueError("points_per_scan must be ≥ 1 or None")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.checkpoint) / "eval"


def train_features(
    model: torch.nn.Module, reader: Any, scans: list, cfg: LinearProbeConfig
) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Features (float16, CPU) and labels of the training scans, subsampled per scan."""
    rng = np.random.default_rng(cfg.seed)
    feats, labels = [], []
    for scan in tqdm(scans, desc="features (train)", unit="scan"):
        points, y = reader.load_points(scan), reader.load_labels(scan)
        f = scan_features(model, points, cfg.device)  # (N, D)
        if cfg.points_per_scan is not None and len(y) > cfg.points_per_scan:
            keep = np.sort(rng.choice(len(y), cfg.points_per_scan, replace=False))
            f, y = f[torch.from_numpy(keep)], y[keep]
        feats.append(f.half().cpu())
        labels.append(y)
    return feats, labels


def evaluate_head(
    model: torch.nn.Module,
    head: torch.nn.Module,
    reader: Any,
    scans: list,
    num_classes: int,
    device: str,
    desc: str = "evaluate (val)",
) -> np.ndarray:
    """(C, C) confusion matrix of backbone + head over ``scans``."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for scan in tqdm(scans, desc=desc, unit="scan"):
        f = scan_features(model, reader.load_points(scan), device)
        conf += probe_confusion(head, f, reader.load_labels(scan), num_classes)
    return conf


def results_dict(conf: np.ndarray, class_names: tuple[str, ...] | list[str], **extra: Any) -> dict:
    """The JSON record of an evaluation: mIoU, per-class IoU (NaN → null), confusion matrix."""
    ious = iou_per_class(conf)
    return {
        "miou": mean_iou(conf),
        "iou": {
            n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, ious, strict=True)
        },
        "confusion": conf.tolist(),
        **extra,
    }


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON under a temporary name and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def run_linear_probe(cfg: LinearProbeConfig) -> dict:
    """Run the protocol; writes ``<out>/linear_probe.json`` and returns its content."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.checkpoint, cfg.like, cfg.device, cfg.seed, cfg.data.dataset)
    trained = checkpoint_record(cfg.checkpoint)  # warns on an unfinished run
    reader = open_reader(cfg.data)
    names = list(reader.class_names)
    train_scans, val_scans = cfg.data.train_scans(reader), cfg.data.val_scans(reader)
    feats, labels = train_features(model, reader, train_scans, cfg)
    head = fit_linear_probe(feats, labels, len(names), cfg.probe, cfg.device)
    conf = evaluate_head(model, head, reader, val_scans, len(names), cfg.device)
    result = results_dict(
        conf,
        names,
        protocol="linear_probe",
        **trained,
        train_scans=len(train_scans),
        val_scans=len(val_scans),
        config=asdict(cfg),
    )
    write_json_atomic(cfg.out_dir() / "linear_probe.json", result)
    print(
        iou_table(
            names, iou_per_class(conf), result["miou"], title=f"linear probe: {cfg.checkpoint}"
        )
    )
    return result
