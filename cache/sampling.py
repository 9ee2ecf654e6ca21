"""Bilinear sampling of a teacher patch grid at original-image pixels: the one implementation.

Extraction (`pipeline/teacher.py`, which re-exports `sample_features`) samples the float32 grid
at each paired point's pixel when it writes per-point targets; the reader of a ``grid-f16``
cache (`cache/reader.py`) samples the stored float16 grid the same way when it serves a scan.
Keeping one function makes both give the same features up to the fp16 rounding of the grid.
The trainer reaches it through the cache only, never through `pipeline.teacher`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sample_features(
    grid: torch.Tensor, uv: torch.Tensor | np.ndarray, orig_size: tuple[int, int]
) -> torch.Tensor:
    """Bilinear features of a patch grid (D, h, w) at pixels ``uv`` (M, 2) of the original image.

    ``uv`` is (x right, y down) in original-image pixels of size ``orig_size`` = (H0, W0), pixel i
    covering [i, i + 1). The resize maps x ∈ [0, W0) linearly onto [0, W) and patch j covers
    [14 j, 14 (j + 1)), so in patch units p = x * w / W0 and patch j's centre is p = j + 0.5.
    ``grid_sample(align_corners=False)`` puts cell j's centre at n = (2 j + 1) / w - 1, i.e.
    n = 2 p / w - 1 = 2 x / W0 - 1: the normalised coordinate does not depend on the resize.
    Beyond the outermost centres the edge patch's feature is used (padding "border").
    The grid may be any float dtype (computed in float32). Returns (M, D) float32.
    """
    if grid.ndim != 3:
        raise ValueError(f"sample_features: grid must be (D, h, w), got shape {tuple(grid.shape)}")
    uv = torch.as_tensor(uv, dtype=torch.float32, device=grid.device)  # (M, 2)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"sample_features: uv must be (M, 2), got shape {tuple(uv.shape)}")
    h0, w0 = orig_size
    scale = torch.tensor([2.0 / w0, 2.0 / h0], dtype=torch.float32, device=grid.device)
    normalised = uv * scale - 1.0  # (M, 2) in [-1, 1), x first as grid_sample expects
    sampled = F.grid_sample(
        grid[None].float(),  # (1, D, h, w)
        normalised[None, None],  # (1, 1, M, 2)
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )  # (1, D, 1, M)
    return sampled[0, :, 0].T  # (M, D)


def sample_view_grids(
    grid: np.ndarray, sizes: np.ndarray, camera: np.ndarray, uv: np.ndarray
) -> np.ndarray:
    """Features at points from the stored patch grids of one scan's camera images (grid-f16).

    ``grid`` (R, D): the views' grids one after another, each h x w rows in row-major order
    (row y * w + x of view v = patch (y, x)); ``sizes`` (V, 4) int: h, w, H0, W0 of each view;
    ``camera`` (M,) int: the view of each point; ``uv`` (M, 2) float32 pixels in that view's
    original image. Each view is sampled with `sample_features`; returns (M, D) float16.
    """
    out = np.empty((len(camera), grid.shape[1]), np.float16)  # (M, D)
    starts = np.concatenate([[0], np.cumsum(sizes[:, 0].astype(np.int64) * sizes[:, 1])])
    cells = torch.from_numpy(grid)  # (R, D)
    for c in np.unique(camera):
        h, w, h0, w0 = (int(v) for v in sizes[c])
        view = cells[starts[c] : starts[c + 1]].reshape(h, w, -1).permute(2, 0, 1)  # (D, h, w)
        mask = camera == c  # (M,)
        out[mask] = sample_features(view, uv[mask], (h0, w0)).half().numpy()
    return out
