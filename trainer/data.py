"""Training data: scans and targets from the cache (never the teacher), augmented and voxelised.

- `open_training_cache(cfg)`: the cache, checked against the dataset and split asked for.
- `usable_scans(reader, cfg, rank, world)`: the scans of the units that pass the check; under
  DDP each process checks its share (`unit_problems_share`) and the findings are exchanged.
- `augment(xyz, scale_range, rng)`: rotation about z, x/y flips, scaling (fine-tuning uses it too).
- `ScanDataset[(epoch, i)]`: scan i of the cache as numpy arrays; its randomness (augmentation,
  masking, ray sampling) is a function of (seed, epoch, i) only, so any number of workers, and a
  resumed run, see exactly the same samples.
- `RunBatchSampler`: the batches of a whole run, epoch after epoch; epoch e's order is a
  permutation drawn from (seed, e), sharded over the processes; it can start at any step.
- `collate`: a list of samples → one batch of flat tensors (ME batched coordinates).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cache import (
    CacheError,
    CacheKeyMismatch,
    CacheReader,
    dataset_files,
    dataset_fingerprint,
    open_cache,
    resolve_cache,
)
from trainer.config import TrainConfig
from trainer.minkowski import ME
from trainer.model import StudentConfig, input_features, voxel_coordinates
from trainer.occupancy import block_mask, occupancy_targets


def open_training_cache(cfg: TrainConfig) -> CacheReader:
    """Open the cache and refuse it unless it was extracted from ``cfg.data`` (fingerprint of the
    nuScenes metadata) for ``cfg.split``; an incomplete cache is refused by `open_cache`."""
    from pipeline.datasets.nuscenes import NuScenesReader  # plain reader, no images/teacher

    path = resolve_cache(cfg.cache)
    reader = open_cache(path)
    dataset = NuScenesReader(cfg.data, cfg.version)
    held = reader.key.dataset_fingerprint
    # Caches made before 2026-11-26 were fingerprinted over every JSON table: hashed only when
    # needed (v1.0-trainval's tables are gigabytes).
    if held != dataset_fingerprint(dataset.metadata_files()) and held != dataset_fingerprint(
        dataset.legacy_metadata_files()
    ):
        raise CacheKeyMismatch(
            f"cache {path} was not extracted from the dataset at {cfg.data} "
            f"({dataset.version}): {_changed_files(path, dataset)}; extract a cache for it "
            "(python cli.py extract-teacher) or pass the matching --data/--version"
        )
    if reader.key.split != cfg.split:
        raise CacheKeyMismatch(
            f"cache {path} does not match the training data: key field 'split' is "
            f"{reader.key.split!r} in the cache but {cfg.split!r} for split {cfg.split!r}; "
            "extract a cache for it (python cli.py extract-teacher) or pass the matching --split"
        )
    return reader


def _changed_files(path: Path, dataset: Any) -> str:
    """Which metadata tables differ between the cache's manifest and the dataset, in words."""
    from cache.store import load_manifest

    recorded = load_manifest(path).get("meta", {}).get("dataset_files")
    if not isinstance(recorded, dict):  # caches made before the manifest listed them
        return "its metadata tables differ (this cache does not list them)"
    present = dataset_files(dataset.metadata_files())
    changed = sorted(n for n in recorded.keys() & present.keys() if recorded[n] != present[n])
    parts = [
        f"{what}: {', '.join(names)}"
        for what, names in (
            ("changed", changed),
            ("only in the cache's dataset", sorted(recorded.keys() - present.keys())),
            ("only in this dataset", sorted(present.keys() - recorded.keys())),
        )
        if names
    ]
    return "; ".join(parts) or "its metadata tables differ"


def unit_problems_share(
    reader: CacheReader, checksums: bool, rank: int = 0, world: int = 1
) -> dict[int, list[str]]:
    """Problems of every ``world``-th unit of the cache from ``rank`` (unit -> lines; [] when
    sound): one process's share of `usable_scans`' check."""
    from cache.store import load_manifest, unit_problems

    units = load_manifest(reader.path)["units"]
    return {
        u: unit_problems(reader.path, u, units[u], checksums=checksums)
        for u in range(rank, len(units), world)
    }


def usable_scans(
    reader: CacheReader, cfg: TrainConfig, rank: int = 0, world: int = 1
) -> tuple[list[int], list[str]]:
    """(indices of the scans to train on, problems found) after checking every unit of the cache.

    The check is structural (each unit's `.done` marker and files, by size: a missing unit, a
    truncated shard, a lost file), plus every checksum and offset with ``cfg.verify_cache``. A
    cache with problems is refused (`CacheError` listing them) unless ``cfg.skip_bad_scans``:
    then the scans of the bad units are left out and the others returned.

    Under DDP (``world`` > 1, process group joined) each process checks every ``world``-th unit
    from its ``rank`` and the findings are exchanged: the cache is read once in all, not once per
    process, and every process gets the same answer."""
    from cache.store import load_manifest

    units = load_manifest(reader.path)["units"]
    found = unit_problems_share(reader, cfg.verify_cache, rank, world)
    if world > 1:
        shares: list[dict[int, list[str]] | None] = [None] * world
        torch.distributed.all_gather_object(shares, found)
        found = {u: lines for share in shares for u, lines in share.items()}
    keep: list[int] = []
    problems: list[str] = []
    first = 0  # index of the unit's first scan
    for u, tokens in enumerate(units):
        problems += found[u]
        if not found[u]:
            keep += range(first, first + len(tokens))
        first += len(tokens)
    if problems and not cfg.skip_bad_scans:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise CacheError(
            f"cache {reader.path} fails verification ({len(problems)} problem(s)): {shown}. "
            "Run `python cli.py cache verify` for the list, re-extract, or pass --skip-bad-scans "
            "to train without the bad units' scans"
        )
    if not keep:
        raise CacheError(f"cache {reader.path}: no scan left after skipping the bad units")
    return keep, problems


def augment(
    xyz: np.ndarray, scale_range: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """(N, 3) points rotated about z, flipped in x and/or y, scaled by a factor drawn from
    ``scale_range``; the sensor stays at the origin (rays keep their meaning). Fine-tuning uses
    it too."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0])
    scale = rng.uniform(*scale_range)
    return (xyz.astype(np.float64) @ (rot @ flip).T * scale).astype(np.float32)


class ScanDataset(Dataset):
    """Item (epoch, i) → dict of numpy arrays for scan i (see `__getitem__`)."""

    def __init__(
        self, reader: CacheReader, cfg: TrainConfig, scans: list[int] | None = None
    ) -> None:
        self.reader = reader
        self.cfg = cfg
        self.student = StudentConfig(backbone=cfg.backbone, voxel_size=cfg.voxel_size)
        self.scans = list(range(len(reader))) if scans is None else list(scans)
        """Cache indices of the scans served: item k is scan ``scans[k]`` (see `usable_scans`)."""

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, k = item
        i = self.scans[k]  # cache index: the randomness follows the scan, not its position
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch, i])
        # 1. read the scan and its targets from the cache (points, per-point targets, pairing)
        scan = self.reader.read_scan(i)
        xyz = scan.points[:, :3]  # (N, 3)
        # 2. augment the points; the per-point targets need nothing (they are rows of the points)
        if cfg.augment:
            xyz = augment(xyz, cfg.scale_range, rng)
        voxels = voxel_coordinates(xyz, cfg.voxel_size).numpy()  # (N, 3) int32
        # 3. occupancy: drop random blocks from the input; targets from the full scan
        keep = np.ones(len(xyz), bool)
        cells = np.zeros((0, 3), np.int64)
        labels = np.zeros(0, np.float32)
        if cfg.occupancy_weight > 0:
            keep = block_mask(voxels, cfg.occupancy_stride, cfg.mask_block, cfg.mask_ratio, rng)
            cells, labels = occupancy_targets(
                voxels, keep, xyz, cfg.voxel_size, cfg.occupancy_stride, cfg.rays_per_scan,
                cfg.occupancy_range, cfg.occupancy_z, rng,
            )  # fmt: skip
        # 4. the student's input: voxel indices and features of the kept points
        points = np.concatenate([xyz, scan.points[:, 3:4]], axis=1)[keep]  # (n, 4)
        feats = input_features(torch.from_numpy(points), self.student).numpy()  # (n, C_in)
        return {
            "coords": voxels[keep],  # (n, 3) int32
            "feats": feats,  # (n, C_in) float32
            "target": scan.target[keep],  # (n, D) float16
            "paired": scan.paired[keep],  # (n,) bool
            "occ_cells": (cells * cfg.occupancy_stride).astype(np.int32),  # (M, 3) voxel units
            "occ_labels": labels,  # (M,) float32
            "epoch": epoch,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples → one batch: ME batched coordinates (N, 4) and flat per-point tensors."""
    coords = ME.utils.batched_coordinates(
        [torch.from_numpy(it["coords"]) for it in items], dtype=torch.float32
    )  # (N, 4) batch index, x, y, z
    queries = ME.utils.batched_coordinates(
        [torch.from_numpy(it["occ_cells"]) for it in items], dtype=torch.int32
    )  # (M, 4)
    return {
        "coords": coords,
        "feats": torch.from_numpy(np.concatenate([it["feats"] for it in items])),  # (N, C_in)
        "target": torch.from_numpy(np.concatenate([it["target"] for it in items])),  # (N, D)
        "paired": torch.from_numpy(np.concatenate([it["paired"] for it in items])),  # (N,)
        "queries": queries,
        "occ_labels": torch.from_numpy(np.concatenate([it["occ_labels"] for it in items])),
        "epoch": items[0]["epoch"],
        "scans": len(items),
    }


class RunBatchSampler:
    """Batches of (epoch, index) for a whole run, starting at global step ``start_step``.

    Epoch e uses the permutation of ``np.random.default_rng([seed, e])``, wrapped to a multiple
    of ``world`` and sharded ``perm[rank::world]``; each process takes ``steps_per_epoch``
    full batches of it (the remainder is left out, so every process makes the same steps).
    """

    def __init__(
        self, n: int, batch_size: int, epochs: int, seed: int, rank: int = 0, world: int = 1,
        start_step: int = 0,
    ) -> None:  # fmt: skip
        self.n, self.batch_size, self.epochs, self.seed = n, batch_size, epochs, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self.steps_per_epoch = -(-n // world) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{n} scans are fewer than batch_size {batch_size} x {world} process(es): "
                "no full batch; lower --batch-size"
            )

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        perm = np.resize(perm, -(-self.n // self.world) * self.world)  # wrap to equal shards
        shard = perm[self.rank :: self.world]
        b = self.batch_size
        return [
            [(epoch, int(i)) for i in shard[k * b : (k + 1) * b]]
            for k in range(self.steps_per_epoch)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first_epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        for epoch in range(first_epoch, self.epochs):
            yield from self.epoch_batches(epoch)[skip if epoch == first_epoch else 0 :]

    def __len__(self) -> int:
        return self.total_steps - self.start_step
