"""The linear classifier of the linear-probe protocol, on precomputed (frozen) point features.

Frozen features make the probe a convex problem (multinomial logistic regression per point), so
the optimiser only has to converge: a fixed number of AdamW steps with a cosine-decayed learning
rate over shuffled mini-batches of points pooled from all training scans. The features are
standardised first (per-dimension mean and std of the training points, folded into the
classifier), which does not change what a linear layer can express but makes one learning rate
work for every backbone, whatever the scale of its features.

A class that never occurs in the training labels cannot be learned, only guessed from the
initial weights; the classifier predicts only the classes it was trained on (the logits of the
others are masked to -inf), so a backbone is not charged for what the random initialisation of
those rows does on its features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from trainer.evaluate.metrics import IGNORE_INDEX, confusion_matrix


@dataclass(frozen=True)
class ProbeConfig:
    """How the linear classifier is fitted."""

    steps: int = 1000
    """AdamW steps (the problem is convex: a fixed budget, independent of the dataset size)."""
    lr: float = 1e-2
    """Peak AdamW learning rate (a linear layer on frozen features tolerates a high one)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    batch_points: int = 16_384
    """Points per optimisation step."""
    seed: int = 0
    """Seed of the initialisation and of the shuffling."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_points < 1 or self.lr <= 0:
            raise ValueError("steps, batch_points and lr must be positive")


def fit_linear_probe(
    features: list[torch.Tensor],
    labels: list[np.ndarray],
    num_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
    device: str = "cpu",
) -> torch.nn.Module:
    """Fit one linear layer features → classes with cross-entropy; ignored points are skipped."""
    x = torch.cat([f.float().cpu() for f in features])  # (N, D)
    y = torch.as_tensor(np.concatenate(labels).astype(np.int64))  # (N,)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows for {len(y)} labels")
    keep = y != IGNORE_INDEX
    x, y = x[keep], y[keep]
    if len(y) == 0:
        raise ValueError("no labelled training points for the linear probe")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # (D,), (D,)
    seen = torch.bincount(y, minlength=num_classes)[:num_classes] > 0  # (C,) bool
    head = torch.nn.Sequential(
        Standardize(mean, std), torch.nn.Linear(x.shape[1], num_classes), MaskClasses(seen)
    )
    head = head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    head.train()
    order, pos = torch.randperm(len(y), generator=g), 0
    for _ in tqdm(range(cfg.steps), desc="linear probe", unit="step", leave=False):
        if pos >= len(y):  # next epoch: reshuffle
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + cfg.batch_points]
        pos += cfg.batch_points
        logits = head(x[idx].to(device))  # (B, C)
        loss = torch.nn.functional.cross_entropy(logits, y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    return head


class Standardize(torch.nn.Module):
    """(x - mean) / std with fixed training statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("std", std)  # (D,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MaskClasses(torch.nn.Module):
    """Logits of the classes not in ``allowed`` (C,) bool set to -inf."""

    def __init__(self, allowed: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("allowed", allowed)  # (C,) bool

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed, float("-inf"))


@torch.no_grad()
def predict(head: torch.nn.Module, features: torch.Tensor) -> np.ndarray:
    """(N,) int64 predicted class of each point."""
    param = next(head.parameters())
    return head(features.to(param.device, param.dtype)).argmax(1).cpu().numpy()


def probe_confusion(
    head: torch.nn.Module, features: torch.Tensor, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """(C, C) confusion matrix of the head on one scan's features."""
    return confusion_matrix(predict(head, features), labels, num_classes)
