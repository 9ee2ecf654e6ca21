"""Segmentation and representation metrics: confusion matrix, per-class IoU, mIoU, RankMe.

Conventions (also in docs/evaluation.md):
- Labels live in ``0..C-1``; ``ignore_index`` (255) marks points that count nowhere.
- IoU_c = TP / (TP + FP + FN). A class absent from both the ground truth and the predictions of the
  whole evaluated set has 0/0 = NaN IoU and is left out of the mean (``np.nanmean``). A class that
  is absent from the ground truth but predicted somewhere has IoU 0 and counts.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = 255


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignored points dropped."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    gt = np.asarray(gt).ravel().astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt lengths differ: {pred.shape[0]} vs {gt.shape[0]}")
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth label outside 0..{num_classes - 1}: {gt.min()}..{gt.max()}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction outside 0..{num_classes - 1}: {pred.min()}..{pred.max()}")
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """(C,) float64 IoU per class; NaN where the class is in neither ground truth nor prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp  # TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of the per-class IoUs over the classes that are present (NaN IoUs excluded)."""
    ious = iou_per_class(confusion)
    if np.all(np.isnan(ious)):
        return float("nan")
    return float(np.nanmean(ious))


def iou_table(class_names: list[str], ious: np.ndarray, miou: float, title: str = "") -> str:
    """Plain-text table of per-class IoU (in %), one class a line, mIoU last."""
    width = max([len(n) for n in class_names] + [4])
    lines = [title] if title else []
    lines.append(f"{'class'.ljust(width)}  IoU %")
    for name, iou in zip(class_names, ious, strict=True):
        lines.append(f"{name.ljust(width)}  {'  n/a' if np.isnan(iou) else f'{100 * iou:5.1f}'}")
    lines.append(f"{'mIoU'.ljust(width)}  {100 * miou:5.1f}")
    return "\n".join(lines)


def rankme(
    features: np.ndarray | torch.Tensor,
    max_points: int = 20_000,
    seed: int = 0,
    eps: float = 1e-7,
) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values.

    ``p_k = σ_k / Σσ + eps``, ``RankMe = exp(-Σ p_k log p_k)``. A matrix of rank r with equal
    singular values scores r; the score lies in [1, min(N, D)]. Rows (points) beyond
    ``max_points`` are subsampled uniformly at random (seeded) so the SVD stays cheap.
    """
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    x = x.detach().to(torch.float64).cpu()  # (N, D)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"rankme needs a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if x.shape[0] > max_points:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:max_points]]
    sigma = torch.linalg.svdvals(x)  # (min(N, D),)
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
