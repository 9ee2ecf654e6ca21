"""Distillation loss: 1 − cosine similarity between projected student and teacher features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(
    pred: torch.Tensor, target: torch.Tensor, paired: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over paired points of 1 − cos(pred_p, target_p).

    pred (N, D) head outputs; target (N, D) teacher features (any float dtype); paired (N,) bool,
    default every row (the trainer predicts at the paired points only). Unpaired points
    contribute nothing; with no paired point the loss is 0 (still differentiable, zero
    gradient), never NaN. Computed in float32.
    """
    if paired is None:
        paired = torch.ones(len(pred), dtype=torch.bool, device=pred.device)
    if pred.shape != target.shape or paired.shape != pred.shape[:1]:
        raise ValueError(
            f"distill_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
            f"paired {tuple(paired.shape)} do not match"
        )
    if not bool(paired.any()):
        return pred.sum() * 0.0
    cos = F.cosine_similarity(pred[paired].float(), target[paired].float(), dim=1, eps=1e-8)  # (P,)
    return (1.0 - cos).mean()
