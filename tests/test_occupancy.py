"""Occupancy targets (masking, ray-traced free space), decoder and loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.model import voxel_coordinates
from trainer.occupancy import (
    block_mask,
    cell_keys,
    occupancy_loss,
    occupancy_targets,
    ray_free_cells,
)

VOXEL, STRIDE = 0.1, 8  # 0.8 m cells


def _wall(x: float = 10.0) -> np.ndarray:
    """Points on the plane x = const, y in [-2, 2], z in [-1, 1] (every 5 cm)."""
    y, z = np.meshgrid(np.arange(-2, 2, 0.05), np.arange(-1, 1, 0.05))
    return np.stack([np.full(y.size, x), y.ravel(), z.ravel()], 1).astype(np.float32)


def _cells(xyz: np.ndarray) -> np.ndarray:
    return np.floor_divide(voxel_coordinates(xyz, VOXEL).numpy(), STRIDE)


def _targets(xyz: np.ndarray, keep: np.ndarray, n_rays: int = 10_000):
    voxels = voxel_coordinates(xyz, VOXEL).numpy()
    rng = np.random.default_rng(0)
    return occupancy_targets(voxels, keep, xyz, VOXEL, STRIDE, n_rays, 50.0, (-5.0, 5.0), rng)


def test_masked_cells_positive_free_cells_negative_rest_without_target() -> None:
    xyz = _wall()
    cells = _cells(xyz)
    masked_cell = cells[0]
    keep = ~(cells == masked_cell).all(1)  # drop every point of one cell
    out_cells, labels = _targets(xyz, keep)
    key = dict(zip(cell_keys(out_cells).tolist(), labels.tolist(), strict=True))
    # the masked occupied cell is the one positive
    assert key[int(cell_keys(masked_cell[None])[0])] == 1.0
    assert labels.sum() == 1
    # visible occupied cells carry no target (their answer is in the input)
    visible = np.unique(cells[keep], axis=0)
    assert not np.isin(cell_keys(visible), cell_keys(out_cells)).any()
    # cells between the sensor and the wall are free: x cells 1..10 at y, z = 0
    for cx in range(1, 11):
        assert key.get(int(cell_keys(np.array([[cx, 0, 0]]))[0])) == 0.0, cx
    # behind the wall (x = 12 m, cell 15) and beside the rays (y = 10 m) nothing was observed
    assert int(cell_keys(np.array([[15, 0, 0]]))[0]) not in key
    assert int(cell_keys(np.array([[5, 12, 0]]))[0]) not in key


def test_rays_stop_a_cell_short_of_their_hit() -> None:
    hit = np.array([[8.05, 0.05, 0.05]], np.float32)  # in cell (10, 0, 0)
    free = ray_free_cells(hit, VOXEL, STRIDE, 10, np.random.default_rng(0))
    assert free[:, 0].max() <= 8 and (free[:, 1:] == 0).all()
    assert {0, 8} <= set(free[:, 0].tolist())


def test_range_limits_targets() -> None:
    xyz = _wall(x=30.0)
    voxels = voxel_coordinates(xyz, VOXEL).numpy()
    cells, _ = occupancy_targets(
        voxels, np.ones(len(xyz), bool), xyz, VOXEL, STRIDE, 1000, 10.0, (-5.0, 5.0),
        np.random.default_rng(0),
    )  # fmt: skip
    centres = (cells + 0.5) * VOXEL * STRIDE
    assert len(cells) > 0 and np.abs(centres[:, :2]).max() <= 10.0


def test_block_mask_drops_whole_blocks_at_the_ratio() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-20, 20, (20_000, 3))
    voxels = voxel_coordinates(xyz, VOXEL).numpy()
    assert block_mask(voxels, STRIDE, 2, 0.0, rng).all()
    keep = block_mask(voxels, STRIDE, 2, 0.3, rng)
    blocks = np.floor_divide(voxels, STRIDE * 2)
    _, inverse = np.unique(blocks, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    kept_share = np.bincount(inverse, keep) / np.bincount(inverse)
    assert set(np.unique(kept_share)) == {0.0, 1.0}  # a block is kept or dropped as a whole
    assert (kept_share == 0).mean() == pytest.approx(0.3, abs=0.01)


def test_balanced_loss_constant_predictor_is_log2() -> None:
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert occupancy_loss(torch.zeros(6), labels).item() == pytest.approx(math.log(2), abs=1e-6)
    for c in (-2.0, -0.5, 0.7, 3.0):  # no constant does better than log 2
        assert occupancy_loss(torch.full((6,), c), labels).item() > math.log(2)
    good = torch.tensor([4.0, -4, -4, -4, -4, -4])
    assert occupancy_loss(good, labels).item() < 0.02
    assert occupancy_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0


@pytest.mark.slow
def test_occupancy_decoder_beats_a_constant_predictor(train_cache) -> None:
    """Backbone + decoder trained on occupancy alone for a few steps: the loss on a held-out
    sample (another epoch's augmentation and mask) falls clearly below log 2."""
    from trainer.config import load_config
    from trainer.data import ScanDataset, collate, open_training_cache
    from trainer.loop import DistillModel

    cfg = load_config(
        cache=train_cache.cache, data=train_cache.data, out=train_cache.cache.parent / "unused",
        backbone="tiny", occupancy_weight=1.0, threads=1,
    )  # fmt: skip
    dataset = ScanDataset(open_training_cache(cfg), cfg)
    torch.manual_seed(0)
    model = DistillModel(cfg, train_cache.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(14):
        b = collate([dataset[(step, 2 * step % 6)], dataset[(step, (2 * step + 1) % 6)]])
        _, logits = model(b["coords"], b["feats"], b["queries"], b["paired"])
        loss = occupancy_loss(logits, b["occ_labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        b = collate([dataset[(99, 6)], dataset[(99, 7)]])  # scans never trained on
        _, logits = model(b["coords"], b["feats"], b["queries"], b["paired"])
        held_out = occupancy_loss(logits, b["occ_labels"]).item()
    assert b["occ_labels"].sum() > 10 and (b["occ_labels"] == 0).sum() > 10
    assert held_out < 0.85 * math.log(2), held_out


def test_decoder_without_queries_keeps_its_parameters_in_the_graph() -> None:
    """A batch with no occupancy target gives loss 0 and zero (not missing) gradients (DDP)."""
    from trainer.minkowski import ME
    from trainer.occupancy import OccupancyDecoder

    decoder = OccupancyDecoder(4)
    coords = ME.utils.batched_coordinates([torch.randint(0, 5, (6, 3)) * STRIDE])
    x = ME.SparseTensor(torch.randn(len(coords), 4), coordinates=coords, tensor_stride=STRIDE)
    logits = decoder(x, torch.zeros((0, 4), dtype=torch.int32))
    loss = occupancy_loss(logits, torch.zeros(0))
    loss.backward()
    assert logits.shape == (0,) and loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in decoder.parameters())


def test_cell_keys_are_unique_per_cell_up_to_the_index_limit() -> None:
    """Distinct cells, neighbours and the extreme indices (|index| < 2^20) never share a key."""
    r = np.arange(-3, 4)
    cube = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    big = 2**20 - 1
    extremes = np.array([[big, 0, 0], [0, big, 0], [0, 0, big], [big, big, big], [big, -big, 1]])
    cells = np.concatenate([cube, extremes, -extremes])
    assert len(np.unique(cells, axis=0)) == len(cells)
    assert len(np.unique(cell_keys(cells))) == len(cells)


def test_a_masked_cell_that_rays_cross_is_a_positive_only() -> None:
    """A masked occupied cell between the sensor and a wall is crossed by the rays to the wall:
    it stays a positive, never also a free-space negative (one label per cell)."""
    post = np.array([[4.05 + dx, 0.05 + dy, 0.05] for dx in (0, 0.1) for dy in (0, 0.1)])
    xyz = np.concatenate([_wall(), post.astype(np.float32)])  # post in cell (5, 0, 0)
    keep = np.ones(len(xyz), bool)
    keep[-len(post) :] = False  # the post is masked out of the input
    cells, labels = _targets(xyz, keep)
    keys = cell_keys(cells)
    assert len(np.unique(keys)) == len(keys)  # one label per cell
    post_key = int(cell_keys(np.array([[5, 0, 0]]))[0])
    assert labels[keys == post_key].tolist() == [1.0]
    assert labels[keys == int(cell_keys(np.array([[4, 0, 0]]))[0])].tolist() == [0.0]


def test_range_limits_apply_to_cell_centres() -> None:
    """A cell is kept when its centre ((index + 0.5) * 0.8 m) lies within the ranges: with
    xy_range 9.9 m the last x cell is 11 (centre 9.2 m; cell 12's is 10.0 m), and with z_range
    from -0.5 m the lowest z cell is -1 (centre -0.4 m; its lower face is at -0.8 m)."""
    xyz = _wall(x=30.0)  # rays within 9.9 m of the sensor stay in z cells -1 and 0
    voxels = voxel_coordinates(xyz, VOXEL).numpy()
    cells, _ = occupancy_targets(
        voxels, np.ones(len(xyz), bool), xyz, VOXEL, STRIDE, 5000, 9.9, (-0.5, 5.0),
        np.random.default_rng(0),
    )  # fmt: skip
    assert cells[:, 0].max() == 11 and cells[:, 0].min() == 0
    assert set(cells[:, 2].tolist()) == {-1, 0}
