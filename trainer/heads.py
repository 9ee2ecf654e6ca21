"""Projection heads: student point features (N, C) → teacher space (N, D)."""

from __future__ import annotations

from torch import nn


def build_head(kind: str, c_in: int, d_out: int, hidden: int = 512) -> nn.Module:
    """``"mlp"``: Linear-LayerNorm-GELU, Linear-LayerNorm-GELU, Linear (the method's head);
    ``"linear"``: one Linear layer (the ablation)."""
    if kind == "linear":
        return nn.Linear(c_in, d_out)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(c_in, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, d_out),
        )
    raise ValueError(f"unknown head {kind!r}; known: mlp, linear")
