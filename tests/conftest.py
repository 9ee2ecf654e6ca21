"""Shared pytest fixtures (each helper only ADDS fixtures here)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest


# ---------------------------------------------------------------- teacher (pipeline/teacher.py) ----
@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a RANDOM tiny Dinov2Model (D=64, 2 layers, patch 14) saved with save_pretrained."""
    from pipeline.teacher import save_random_teacher

    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "tiny-dinov2", size="tiny")


# ---------------------------------------------------------------- SemanticKITTI (evaluation) ----
@pytest.fixture(scope="session")
def synthetic_semantickitti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny synthetic SemanticKITTI set: sequences 00, 03 (train) and 08 (val), 2 scans
    each, 16 beams x 180 azimuth steps (~2.5k points a scan)."""
    from pipeline.synthetic.semantickitti import SyntheticKittiConfig, write_synthetic_semantickitti

    cfg = SyntheticKittiConfig(
        sequences=("00", "03", "08"), frames_per_sequence=2, beams=16, azimuth_steps=180
    )
    return write_synthetic_semantickitti(tmp_path_factory.mktemp("kitti") / "semantickitti", cfg)


# ---------------------------------------------------------------- synthetic nuScenes (pipeline/synthetic) ----
class SyntheticNuScenes(NamedTuple):
    """A generated nuScenes-lidarseg release; unpacks as ``root, version = synthetic_nuscenes``."""

    root: Path  # the dataroot (holds v1.0-synthetic/, samples/, lidarseg/, maps/, synthetic_semantic/)
    version: str  # "v1.0-synthetic"


@pytest.fixture(scope="session")
def synthetic_nuscenes(tmp_path_factory: pytest.TempPathFactory) -> SyntheticNuScenes:
    """The demo synthetic nuScenes set (seed 0): scenes scene-0001 and scene-0002, 4 keyframes each,
    6 cameras at 640x360, ~30k LiDAR points a sweep, lidarseg labels. Generated once per session."""
    from pipeline.synthetic import VERSION, SyntheticConfig, make_synthetic

    root = make_synthetic(SyntheticConfig(out=tmp_path_factory.mktemp("nuscenes") / "synthetic"))
    return SyntheticNuScenes(root=root, version=VERSION)


# ---------------------------------------------------------------- trainer: small target caches ----
def _raycast_scan(rng, beams: int, azimuths: int, max_range: float = 30.0):
    """A LiDAR-like sweep from the origin: ground plane z = -1.8 and 6 random boxes, ray-cast.
    Returns (points (N, 4) float32, class (N,) int) of the rays that hit something."""
    import numpy as np

    elev = np.deg2rad(np.linspace(-25, 8, beams))
    azim = np.linspace(0, 2 * np.pi, azimuths, endpoint=False) + rng.uniform(0, 0.01)
    el, az = np.meshgrid(elev, azim, indexing="ij")
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    t_best = np.full(len(d), np.inf)
    cls = np.zeros(len(d), int)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(d[:, 2] < 0, -1.8 / d[:, 2], np.inf)
        t_best = np.minimum(t_best, t_ground)
        for k in range(6):
            centre = np.array([*rng.uniform(-15, 15, 2), -1.8])
            if np.linalg.norm(centre[:2]) < 4:
                centre[:2] += 6
            half = np.array([*rng.uniform(0.8, 2.5, 2), rng.uniform(0.8, 1.8)])
            lo, hi = centre - half, centre + half
            lo[2] = -1.8
            t1, t2 = lo / d, hi / d
            t_near = np.nanmax(np.minimum(t1, t2), axis=1)
            t_far = np.nanmin(np.maximum(t1, t2), axis=1)
            hit = (t_near <= t_far) & (t_near > 0) & (t_near < t_best)
            t_best = np.where(hit, t_near, t_best)
            cls = np.where(hit, 1 + k % 3, cls)
    ok = t_best < max_range
    xyz = d[ok] * t_best[ok, None]
    intensity = rng.uniform(0, 255, (len(xyz), 1))
    return np.concatenate([xyz, intensity], 1).astype(np.float32), cls[ok]


def write_train_cache(
    root: Path, data: Path, *, scans: int = 8, dim: int = 16, split: str = "train",
    beams: int = 16, azimuths: int = 256, seed: int = 0, finalize: bool = True,
    fingerprint: str | None = None, nan_scans: tuple[int, ...] = (),
) -> Path:  # fmt: skip
    """A complete (or, finalize=False, incomplete) cache for the nuScenes metadata under ``data``:
    ray-cast scans, targets = fixed function of class and position (learnable), points with
    x > 0 paired (camera 0), the others unpaired. ``fingerprint`` replaces the dataset's; the
    scans numbered in ``nan_scans`` get NaN targets (a cache a diverged teacher wrote).
    Returns the cache folder."""
    import numpy as np

    from cache import CacheKey, CacheWriter, UnitData, dataset_files, dataset_fingerprint
    from pipeline.datasets.nuscenes import NuScenesReader

    key = CacheKey(
        dataset_fingerprint=fingerprint or dataset_fingerprint(NuScenesReader(data).metadata_files()),
        split=split, teacher="test-targets", teacher_weights_sha256="0" * 64,
        image_size=(28, 56), feature_layer="last", pairing='{"test": true}',
    )  # fmt: skip
    tokens = [f"scan{i:03d}" for i in range(scans)]
    units = [tokens[i : i + 4] for i in range(0, scans, 4)]
    meta = {"test": True, "dataset_files": dataset_files(NuScenesReader(data).metadata_files())}
    writer = CacheWriter.create(root, key, units, dim, meta=meta)
    basis = np.random.default_rng(123)
    class_vec = basis.normal(size=(4, dim))
    mix = basis.normal(size=(3, dim))
    rng = np.random.default_rng(seed)
    for u, unit_tokens in enumerate(units):
        parts: dict[str, list] = {k: [] for k in ("points", "target", "camera", "uv", "label")}
        for k in range(len(unit_tokens)):
            pts, cls = _raycast_scan(rng, beams, azimuths)
            target = class_vec[cls] + 0.5 * np.tanh(pts[:, :3] / [10, 10, 2]) @ mix
            if 4 * u + k in nan_scans:
                target[:] = np.nan
            camera = np.where(pts[:, 0] > 0, 0, -1).astype(np.int8)
            parts["points"].append(pts)
            parts["target"].append(target.astype(np.float16))
            parts["camera"].append(camera)
            parts["uv"].append(np.zeros((len(pts), 2), np.float32))
            parts["label"].append(cls.astype(np.uint8))
        data_u = UnitData(
            tokens=unit_tokens, lidar_paths=[f"/none/{t}.bin" for t in unit_tokens], **parts
        )
        if finalize or u < len(units) - 1:
            writer.write_unit(u, data_u)
    if finalize:
        writer.finalize({"test": True})
    return writer.path


def write_nuscenes_tables(root: Path, version: str = "v1.0-test", tag: str = "") -> Path:
    """Minimal nuScenes metadata (the required tables, empty) so NuScenesReader opens it and the
    dataset fingerprint is defined; ``tag`` changes the fingerprint."""
    vdir = root / version
    vdir.mkdir(parents=True, exist_ok=True)
    for name in ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor"):
        (vdir / f"{name}.json").write_text("[]" if name != "scene" else f'[{{"tag": "{tag}"}}]')
    return root


class TrainCache(NamedTuple):
    """A small complete target cache and the (metadata-only) dataset it claims to come from."""

    cache: Path  # ROOT/<digest>
    data: Path  # nuScenes root holding v1.0-test/ (tables only)
    dim: int  # target feature dimension


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory: pytest.TempPathFactory) -> TrainCache:
    """8 ray-cast scans (~2.5k points each), D=16 learnable targets, about half the points paired."""
    base = tmp_path_factory.mktemp("train_cache")
    data = write_nuscenes_tables(base / "nuscenes")
    return TrainCache(cache=write_train_cache(base / "cache", data), data=data, dim=16)


# ---------------------------------------------------------------- trainer: import isolation ----
TEACHER_MODULES = ("pipeline.teacher", "pipeline.extract", "transformers")


def run_cli_without_teacher(argv: list[str]) -> None:
    """Run ``cli.py argv`` in a fresh interpreter; assert it succeeds and never imports the
    teacher, the extraction or transformers (stage two needs the cache only)."""
    import subprocess
    import sys

    code = f"""
import sys
from cli import app
try:
    app({argv!r})
except SystemExit as e:
    assert e.code in (0, None), e.code
bad = [m for m in {TEACHER_MODULES!r} if m in sys.modules]
assert not bad, bad
print("ok")
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
