"""benchmarks/replicate.py: K copies of a set's scenes under new tokens, the same files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from replicate import replicate  # noqa: E402

from pipeline.datasets.nuscenes import NuScenesReader  # noqa: E402


def test_copies_are_the_same_scans_under_new_tokens(synthetic_nuscenes, tmp_path: Path) -> None:
    from nuscenes.nuscenes import NuScenes

    root, version = synthetic_nuscenes
    replicate(root, tmp_path / "x3", copies=3)
    # the official devkit loads it and follows every token (its reverse index raises otherwise)
    nusc = NuScenes(version=version, dataroot=str(tmp_path / "x3"), verbose=False)
    original = NuScenesReader(root, version)
    copied = NuScenesReader(tmp_path / "x3", version)
    scans, copies = original.scans("all"), copied.scans("all")
    assert len(nusc.sample) == len(copies) == 3 * len(scans) == 24
    assert len({s.token for s in copies}) == len(copies)  # every token new (copy 0 keeps its own)
    assert [s.token for s in copies[: len(scans)]] == [s.token for s in scans]
    for k in (1, 2):
        for a, b in zip(scans, copies[k * len(scans) : (k + 1) * len(scans)], strict=True):
            assert a.token != b.token
            assert np.array_equal(original.load_points(a), copied.load_points(b))
            assert np.array_equal(original.load_labels(a), copied.load_labels(b))
            assert [Path(c.image_path).resolve() for c in a.cameras] == [
                Path(c.image_path).resolve() for c in b.cameras
            ]
            assert all(
                np.array_equal(ca.sensor_to_ego, cb.sensor_to_ego)
                and np.array_equal(ca.ego_to_global, cb.ego_to_global)
                for ca, cb in zip(a.cameras, b.cameras, strict=True)
            )


def test_only_the_named_scenes(synthetic_nuscenes, tmp_path: Path) -> None:
    root, version = synthetic_nuscenes
    val = NuScenesReader(root, version).scene_names("val")
    replicate(root, tmp_path / "val", copies=2, scenes=val)
    reader = NuScenesReader(tmp_path / "val", version)
    assert reader.scene_names("all") == [*val, *(f"{n}-r1" for n in val)]
    assert len(reader.scans("all")) == 2 * len(NuScenesReader(root, version).scans("val"))
    with pytest.raises(ValueError, match="no scenes named"):
        replicate(root, tmp_path / "bad", copies=2, scenes=["scene-9999"])
