"""A stand-in teacher with content: a small DINOv2 fitted to the synthetic world's labels.

No DINOv2 weights can be downloaded here, and a randomly initialised ViT has features without
semantics (its class-mean features are nearly parallel), so distilling it proves nothing about
the method. Real DINOv2 patch features separate semantic classes linearly; this module gives a
small DINOv2 that property on the synthetic world, so the demo can show that the student
*learns what the teacher knows*:

- the same HF ``Dinov2Model`` architecture and loading path as a real teacher (`random_teacher`,
  then ``save_pretrained``), so extraction cannot tell the difference except by a config flag;
- fitted on the camera images of one split (``train``: the linear probe scores ``val``) by a
  linear classifier on its last-layer patch features, sampled bilinearly (`sample_features`,
  the extraction's own sampling) at the pixels where paired LiDAR points fall, with those
  points' lidarseg classes as targets (cross-entropy, ignore label 255);
- the classifier is thrown away; the saved model carries ``FITTED_MARKER`` in its config.json and
  a README saying what it is. Extraction warns that its targets are demo/test only.

This is a stand-in for a foundation model, not a method: the labels it was fitted on are those
the linear probe is trained with (never those it is scored on).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cache.sampling import sample_features
from pipeline.datasets.nuscenes import NuScenesReader
from pipeline.datasets.records import IGNORE_LABEL
from pipeline.outputs import check_parents
from pipeline.pairing import PairingConfig, pair_points
from pipeline.teacher import (
    FITTED_MARKER,
    RANDOM_MARKER,
    RANDOM_SIZES,
    normalise,
    patch_tokens,
    random_teacher,
    resize_uint8,
    save_teacher_folder,
)

FITTED_README = """# STAND-IN DINOv2 fitted to synthetic labels — for demos and tests only

This folder holds a small {arch} ({size}: hidden size {dim}, {layers} layers, patch 14) written
by `python cli.py make-teacher --fit-on DATA`. It is NOT a DINOv2 trained by self-supervision:
starting from random weights (seed {seed}), it was fitted for {epochs} epochs so that a linear
classifier on its last-layer patch features predicts the lidarseg class of the LiDAR points
seen in the `{split}` split's camera images of {data}.
It stands in for a real foundation model (whose features separate classes linearly) where none
can be downloaded. Point accuracy of its linear classifier on the `{split}` images: {accuracy:.1%}
(fitting), {val_accuracy} (held-out `val` images).
Its config.json carries `"{marker}"`; extraction prints a warning when it sees it.
"""


@dataclass(frozen=True)
class FitConfig:
    """How a stand-in teacher is fitted (`fit_teacher`)."""

    data: Path
    """nuScenes-format root (the synthetic set)."""
    out: Path
    """Teacher folder to create."""
    size: str = "small"
    """Architecture: a key of ``RANDOM_SIZES``."""
    split: str = "train"
    """Split whose images and labels fit the teacher (keep ``val`` for scoring)."""
    image_size: tuple[int, int] = (224, 392)
    """(H, W) the images are resized to while fitting (multiples of 14)."""
    epochs: int = 20
    """Passes over the split's images."""
    batch_size: int = 6
    """Images per step."""
    points_per_image: int = 1024
    """Paired points sampled per image and step (all when fewer)."""
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to 0)."""
    seed: int = 0
    """Initialisation, image order and point sampling."""
    progress: bool = True
    """Show a progress bar."""
    pairing: PairingConfig = field(default_factory=PairingConfig)
    """How points are paired with pixels (the extraction's default)."""

    def __post_init__(self) -> None:
        if self.size not in RANDOM_SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {sorted(RANDOM_SIZES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.points_per_image < 1:
            raise ValueError("epochs, batch_size and points_per_image must be >= 1")
        if any(s % 14 for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be multiples of 14")


@dataclass
class _View:
    """One camera image of the split with its labelled paired points."""

    pixels: torch.Tensor  # (3, H, W) uint8, resized
    orig_size: tuple[int, int]  # (H0, W0)
    uv: torch.Tensor  # (M, 2) float32 original-image pixels of the labelled paired points
    label: torch.Tensor  # (M,) int64 challenge classes 0..15


def _views(reader: NuScenesReader, split: str, cfg: FitConfig) -> list[_View]:
    """Every camera image of ``split`` resized to ``cfg.image_size``, with its labelled points."""
    views = []
    scans = reader.scans(split)
    for scan in tqdm(scans, desc=f"fit: load {split}", unit="scan", disable=not cfg.progress):
        points = reader.load_points(scan)
        labels = reader.load_labels(scan)
        pairing = pair_points(points[:, :3], scan, cfg.pairing)
        for c, camera in enumerate(scan.cameras):
            keep = (pairing.camera == c) & (labels != IGNORE_LABEL)
            image = torch.from_numpy(np.array(reader.load_image(camera)))  # (H0, W0, 3)
            pixels = resize_uint8(image.permute(2, 0, 1)[None], cfg.image_size)[0]  # (3, H, W)
            views.append(
                _View(
                    pixels=pixels,
                    orig_size=tuple(image.shape[:2]),
                    uv=torch.from_numpy(pairing.uv[keep]),
                    label=torch.from_numpy(labels[keep].astype(np.int64)),
                )
            )
    return views


def _point_logits(
    model: nn.Module,
    classifier: nn.Linear,
    views: list[_View],
    grid: tuple[int, int],
    rng: np.random.Generator | None,
    points_per_image: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (M, K) and labels (M,) of (a sample of) the labelled points of ``views``."""
    pixels = normalise(torch.stack([v.pixels for v in views]))  # (B, 3, H, W), as the teacher
    tokens = model(pixel_values=pixels).last_hidden_state  # (B, 1 + h*w, D)
    grids = patch_tokens(tokens, 0, grid)  # (B, D, h, w)
    features, labels = [], []
    for k, view in enumerate(views):
        index = torch.arange(len(view.label))
        if rng is not None and len(index) > points_per_image:
            index = torch.from_numpy(rng.choice(len(index), points_per_image, replace=False))
        features.append(sample_features(grids[k], view.uv[index], view.orig_size))  # (m, D)
        labels.append(view.label[index])
    return classifier(torch.cat(features)), torch.cat(labels)


@torch.no_grad()
def _accuracy(model: nn.Module, classifier: nn.Linear, views: list[_View], cfg: FitConfig) -> float:
    """Share of the labelled points of ``views`` that the classifier gets right (all points)."""
    grid = (cfg.image_size[0] // 14, cfg.image_size[1] // 14)
    right = total = 0
    for start in range(0, len(views), cfg.batch_size):
        logits, labels = _point_logits(
            model, classifier, views[start : start + cfg.batch_size], grid, None, 0
        )
        right += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return right / max(total, 1)


def _majority_share(views: list[_View]) -> float | None:
    """Share of the most frequent class among the labelled points (the accuracy to beat)."""
    labels = torch.cat([v.label for v in views]) if views else torch.zeros(0, dtype=torch.int64)
    return float(torch.bincount(labels).max()) / len(labels) if len(labels) else None


def fit_teacher(cfg: FitConfig) -> dict:
    """Fit a stand-in teacher (see the module docstring), save it to ``cfg.out`` and return its
    statistics (also written to ``cfg.out/fit.json``)."""
    out = Path(cfg.out)
    check_parents(out)  # before the fit, not when saving
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or delete it")
    t_start = time.perf_counter()
    reader = NuScenesReader(cfg.data)
    views = _views(reader, cfg.split, cfg)
    if not any(len(v.label) for v in views):
        raise ValueError(f"{cfg.data}: split {cfg.split!r} has no labelled paired points to fit on")
    held_out = not set(reader.scene_names("val")) <= set(reader.scene_names(cfg.split))
    val_views = _views(reader, "val", cfg) if held_out else []  # a one-scene set holds none out

    model = random_teacher(cfg.size, 0, cfg.seed)
    n_classes = int(max(int(v.label.max()) for v in views if len(v.label)) + 1)
    classifier = nn.Linear(model.config.hidden_size, n_classes)
    params = list(model.parameters()) + list(classifier.parameters())
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    steps_per_epoch = -(-len(views) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg.epochs * steps_per_epoch)
    grid = (cfg.image_size[0] // 14, cfg.image_size[1] // 14)
    rng = np.random.default_rng(cfg.seed)
    losses = []
    model.train()
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        desc="fit teacher",
        unit="step",
        disable=not cfg.progress,
    )
    for _ in range(cfg.epochs):
        order = rng.permutation(len(views))
        for start in range(0, len(views), cfg.batch_size):
            batch = [views[i] for i in order[start : start + cfg.batch_size]]
            logits, labels = _point_logits(
                model, classifier, batch, grid, rng, cfg.points_per_image
            )
            loss = F.cross_entropy(logits, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    accuracy = _accuracy(model, classifier, views, cfg)
    val_accuracy = _accuracy(model, classifier, val_views, cfg) if val_views else None
    stats = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "images": len(views),
        "points": int(sum(len(v.label) for v in views)),
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-steps_per_epoch:])),
        "accuracy": accuracy,
        "majority_share": _majority_share(views),
        "val_accuracy": val_accuracy,
        "val_majority_share": _majority_share(val_views),
        "seconds": time.perf_counter() - t_start,
    }
    setattr(model.config, RANDOM_MARKER, False)
    setattr(
        model.config,
        FITTED_MARKER,
        {"data": str(cfg.data), "split": cfg.split, "epochs": cfg.epochs, "seed": cfg.seed},
    )
    dim, layers, _ = RANDOM_SIZES[cfg.size]
    readme = FITTED_README.format(
        arch=type(model).__name__,
        size=cfg.size,
        dim=dim,
        layers=layers,
        seed=cfg.seed,
        epochs=cfg.epochs,
        split=cfg.split,
        data=cfg.data,
        accuracy=accuracy,
        val_accuracy="n/a" if val_accuracy is None else f"{val_accuracy:.1%}",
        marker=FITTED_MARKER,
    )
    save_teacher_folder(
        model, out, {"README.md": readme, "fit.json": json.dumps(stats, indent=2) + "\n"}
    )
    return stats
