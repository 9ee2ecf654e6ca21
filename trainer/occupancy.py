"""Auxiliary occupancy task: predict which coarse cells around the sensor are occupied.

The formulation and why it is so: docs/method.md ("Occupancy"). In short:
- Coarse cells are ``stride`` voxels wide (8 x 0.1 m = 0.8 m), aligned with the U-Net's stride-s
  grid, so a cell's index is ``voxel // stride`` and its ME coordinate ``cell * stride``.
- Masking: the occupied cells are grouped in blocks of ``block`` cells per side; a share of the
  blocks is dropped from the student input (all their points).
- Targets: masked occupied cells are positives (1); cells a LiDAR ray passes before its hit, and
  that hold no point, are negatives (0); every other cell (visible occupied cells, whose answer
  is in the input, and cells no ray observed) has no target.
- Decoder: a 1x1 sparse conv on the decoder's stride-s features, then a 5^3 sparse conv
  evaluated *at the query cells* (ME convolution with given output coordinates; masked and free
  cells hold no input voxel), ReLU, Linear → one logit per query.
- Loss: class-balanced BCE (mean over positives and mean over negatives, averaged), so a
  constant predictor scores at best log 2 whatever the positive share.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.minkowski import ME
from trainer.model import float32_sparse, no_autocast

_OFFSET = 1 << 20  # cell indices are shifted by this into [0, 2^21) before packing into int64


def cell_keys(cells: np.ndarray) -> np.ndarray:
    """(M,) int64 keys of (M, 3) integer cell indices (|index| < 2^20), for set operations."""
    c = cells.astype(np.int64) + _OFFSET
    return (c[:, 0] << 42) | (c[:, 1] << 21) | c[:, 2]


def block_mask(
    voxels: np.ndarray, stride: int, block: int, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """(N,) bool: True for points kept in the input. voxels (N, 3) int voxel indices; the
    occupied blocks (``stride * block`` voxels per side) are dropped with share ``ratio``."""
    blocks = np.floor_divide(voxels, stride * block)  # (N, 3)
    unique, inverse = np.unique(blocks, axis=0, return_inverse=True)
    n_drop = int(round(ratio * len(unique)))
    dropped = np.zeros(len(unique), bool)
    dropped[rng.choice(len(unique), size=n_drop, replace=False)] = True
    return ~dropped[inverse.reshape(-1)]


def ray_free_cells(
    xyz: np.ndarray,
    voxel_size: float,
    stride: int,
    n_rays: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(K, 3) int64 unique cells that sampled LiDAR rays pass before reaching their hit's cell.

    Rays go from the sensor (the origin of the lidar frame) to ``n_rays`` random points of
    xyz (N, 3); each is sampled every half cell from half a cell out to one cell short of the hit
    (so the hit's own cell and its neighbour along the ray are never claimed free).
    """
    if len(xyz) > n_rays:
        xyz = xyz[rng.choice(len(xyz), size=n_rays, replace=False)]
    cell = voxel_size * stride
    dist = np.linalg.norm(xyz, axis=1)  # (R,)
    step = cell / 2
    n_samples = int(np.ceil(dist.max() / step)) if len(dist) else 0
    if n_samples == 0:
        return np.zeros((0, 3), np.int64)
    t = step * np.arange(1, n_samples + 1)  # (S,) distances along the ray
    valid = t[None, :] < (dist[:, None] - cell)  # (R, S)
    direction = xyz / np.maximum(dist, 1e-9)[:, None]  # (R, 3)
    ray, sample = np.nonzero(valid)
    positions = direction[ray] * t[sample][:, None]  # (K', 3)
    cells = np.floor_divide(np.floor(positions / voxel_size).astype(np.int64), stride)
    return np.unique(cells, axis=0)


def occupancy_targets(
    voxels: np.ndarray,
    keep: np.ndarray,
    xyz: np.ndarray,
    voxel_size: float,
    stride: int,
    n_rays: int,
    xy_range: float,
    z_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(cells (M, 3) int64, labels (M,) float32): masked occupied cells → 1, ray-traced free
    cells → 0, limited to cells whose centre lies within ``xy_range`` / ``z_range`` (metres).

    voxels (N, 3) int voxel indices of the full scan, keep (N,) bool input mask, xyz (N, 3) the
    points (lidar frame, sensor at the origin), all in the same (augmented) frame.
    """
    occupied = np.unique(np.floor_divide(voxels, stride).astype(np.int64), axis=0)  # (O, 3)
    visible = np.floor_divide(voxels[keep], stride).astype(np.int64)
    masked = occupied[~np.isin(cell_keys(occupied), cell_keys(visible))]
    free = ray_free_cells(xyz, voxel_size, stride, n_rays, rng)
    free = free[~np.isin(cell_keys(free), cell_keys(occupied))]
    cells = np.concatenate([masked, free])
    labels = np.concatenate([np.ones(len(masked), np.float32), np.zeros(len(free), np.float32)])
    centre = (cells + 0.5) * (voxel_size * stride)  # (M, 3) metres
    inside = (
        (np.abs(centre[:, 0]) <= xy_range)
        & (np.abs(centre[:, 1]) <= xy_range)
        & (centre[:, 2] >= z_range[0])
        & (centre[:, 2] <= z_range[1])
    )
    return cells[inside], labels[inside]


class OccupancyDecoder(nn.Module):
    """Logits of occupancy at query cells from the backbone's stride-s decoder features."""

    def __init__(self, c_in: int, hidden: int = 32, kernel_size: int = 5) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            ME.MinkowskiConvolution(c_in, hidden, kernel_size=1, dimension=3),
            ME.MinkowskiBatchNorm(hidden),
            ME.MinkowskiReLU(),
        )
        # evaluated at the query coordinates (no input voxel needed there)
        self.query = ME.MinkowskiConvolution(
            hidden, hidden, kernel_size=kernel_size, bias=True, dimension=3
        )
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: ME.SparseTensor, queries: torch.Tensor) -> torch.Tensor:
        """features: stride-s SparseTensor; queries (M, 4) int32 batch, x, y, z in voxel units
        (multiples of s). Returns (M,) logits in the order of ``queries``.

        The two sparse convolutions run with autocast off on float32 features (under autocast
        the 1x1 one, an ``F.mm``, would hand bfloat16 features to the 5^3 one, which ME refuses);
        the final Linear follows the caller's autocast."""
        if len(queries) == 0:  # keep every parameter in the graph (DDP expects their gradients)
            return features.F.new_zeros(0) + 0.0 * sum(p.sum() for p in self.parameters())
        with no_autocast(features.F.device):
            x = self.reduce(float32_sparse(features))
            q = self.query(x, coordinates=queries.to(device=x.F.device, dtype=torch.int32))
        return self.out(q.F).squeeze(1)  # (M,)


def occupancy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE: (mean BCE over positives + mean BCE over negatives) / 2; a class
    with no sample is left out; no sample at all gives 0. logits, labels (M,)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    parts = [bce[labels == v].mean() for v in (1.0, 0.0) if bool((labels == v).any())]
    if not parts:
        return logits.sum() * 0.0
    return torch.stack(parts).mean()
