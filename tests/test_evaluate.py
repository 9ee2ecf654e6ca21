"""Evaluation protocols: corruptions, linear probe, fine-tuning subsets, end-to-end commands."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from trainer.evaluate.corruptions import (
    CORRUPTIONS,
    beam_missing,
    corrupt,
    cross_sensor,
    drop_beams,
    drop_points,
    elevation_beams,
    fewer_beams,
    fog,
    jitter,
)
from trainer.evaluate.finetune import select_subset
from trainer.evaluate.metrics import mean_iou
from trainer.evaluate.probe import ProbeConfig, fit_linear_probe, probe_confusion


def _ring_cloud(
    n_beams: int = 8, per_beam: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Points on ``n_beams`` rings of uniformly spaced elevation, their ring ids."""
    rng = np.random.default_rng(seed)
    elev = np.deg2rad(np.linspace(-20, 5, n_beams))
    ring = np.repeat(np.arange(n_beams), per_beam)
    az = rng.uniform(-np.pi, np.pi, len(ring))
    r = rng.uniform(5, 60, len(ring))
    xyz = np.stack(
        [
            r * np.cos(elev[ring]) * np.cos(az),
            r * np.cos(elev[ring]) * np.sin(az),
            r * np.sin(elev[ring]),
        ],
        1,
    )
    points = np.concatenate([xyz, rng.uniform(0, 1, (len(ring), 1))], 1).astype(np.float32)
    return points, ring


# ---------------------------------------------------------------- corruptions


def test_elevation_beams_recovers_uniform_rings():
    points, ring = _ring_cloud()
    np.testing.assert_array_equal(elevation_beams(points[:, :3], 8), ring)


def test_drop_beams_removes_exactly_the_chosen_rings():
    points, ring = _ring_cloud()
    out = drop_beams(points, ring, np.array([1, 4]))
    assert set(np.unique(ring[out.index])) == {0, 2, 3, 5, 6, 7}
    assert len(out.points) == 6 * 50
    np.testing.assert_array_equal(out.points, points[out.index])


def test_beam_missing_is_seeded_and_drops_whole_rings():
    points, ring = _ring_cloud()
    a = beam_missing(points, ring, 0.5, seed=3)
    b = beam_missing(points, ring, 0.5, seed=3)
    c = beam_missing(points, ring, 0.5, seed=4)
    np.testing.assert_array_equal(a.index, b.index)
    assert len(np.unique(ring[a.index])) == 4 and len(a.index) == 4 * 50
    assert not np.array_equal(a.index, c.index)


def test_fewer_beams_keeps_every_kth_ring():
    points, ring = _ring_cloud()
    out = fewer_beams(points, ring, 2)
    assert set(np.unique(ring[out.index])) == {0, 2, 4, 6}


def test_point_drop_jitter_fog_cross_sensor():
    points, ring = _ring_cloud(per_beam=500)
    dropped = drop_points(points, 0.5, seed=0)
    assert 0.45 < len(dropped.index) / len(points) < 0.55
    np.testing.assert_array_equal(dropped.index, drop_points(points, 0.5, seed=0).index)

    jit = jitter(points, 0.1, seed=0)
    np.testing.assert_array_equal(jit.index, np.arange(len(points)))
    assert 0.08 < float(np.std(jit.points[:, :3] - points[:, :3])) < 0.12
    np.testing.assert_array_equal(jit.points[:, 3], points[:, 3])  # intensity untouched

    foggy = fog(points, 0.02, seed=0)
    r = np.linalg.norm(points[:, :3], axis=1)
    near, far = r < 15, r > 45
    kept = np.zeros(len(points), bool)
    kept[foggy.index] = True
    assert kept[near].mean() > kept[far].mean() + 0.3  # far points vanish first
    att = np.exp(-2 * 0.02 * r[foggy.index])
    np.testing.assert_allclose(foggy.points[:, 3], points[foggy.index, 3] * att, rtol=1e-5)

    cs = cross_sensor(points, ring, keep_every=2, point_fraction=0.5, seed=0)
    assert set(np.unique(ring[cs.index])) <= {0, 2, 4, 6}
    assert 0.2 < len(cs.index) / len(points) < 0.3
    np.testing.assert_array_equal(cs.points, points[cs.index])


# docs/evaluation.md's table: the parameter of each corruption at severity 1 / 2 / 3
DOCUMENTED_SEVERITIES = {
    "beam_missing": (0.25, 0.5, 0.75),
    "fewer_beams": (2, 3, 4),
    "cross_sensor": ((2, 0.25), (2, 0.5), (4, 0.5)),
    "point_drop": (0.25, 0.5, 0.75),
    "jitter": (0.04, 0.08, 0.12),
    "fog": (0.005, 0.01, 0.02),
}


@pytest.mark.parametrize("severity", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(DOCUMENTED_SEVERITIES))
def test_each_severity_applies_its_documented_parameter(name, severity):
    assert sorted(CORRUPTIONS) == sorted(DOCUMENTED_SEVERITIES)
    param = DOCUMENTED_SEVERITIES[name][severity - 1]
    points, ring = _ring_cloud(n_beams=12, per_beam=400)
    out = corrupt(name, points, severity, seed=3, beam=ring)
    beams_left = set(np.unique(ring[out.index]).tolist())
    share = len(out.index) / len(points)
    if name == "beam_missing":
        assert len(beams_left) == 12 - round(12 * param)
        assert share == pytest.approx(len(beams_left) / 12)  # whole beams
    elif name in ("fewer_beams", "cross_sensor"):
        k, dropped = (param, 0.0) if name == "fewer_beams" else param
        assert beams_left == {b for b in range(12) if b % k == 0}
        assert share == pytest.approx(len(beams_left) / 12 * (1 - dropped), abs=0.02)
    elif name == "point_drop":
        assert share == pytest.approx(1 - param, abs=0.03)
    elif name == "jitter":
        assert share == 1.0
        assert np.std(out.points[:, :3] - points[:, :3]) == pytest.approx(param, rel=0.05)
    else:  # fog
        r = np.linalg.norm(points[out.index, :3].astype(np.float64), axis=1)
        ratio = out.points[:, 3] / points[out.index, 3]
        np.testing.assert_allclose(ratio, np.exp(-2 * param * r), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_is_deterministic_and_monotone(name):
    points, _ = _ring_cloud(per_beam=400)
    outs = [corrupt(name, points, s, seed=7, n_beams=8) for s in (1, 2, 3)]
    again = corrupt(name, points, 2, seed=7, n_beams=8)
    np.testing.assert_array_equal(outs[1].points, again.points)
    for out in outs:
        assert out.points.dtype == np.float32 and out.points.shape[1] == 4
        assert len(out.points) == len(out.index)
    sizes = [len(o.index) for o in outs]
    assert sizes[0] >= sizes[1] >= sizes[2]  # higher severity never keeps more points
    with pytest.raises(ValueError, match="severity"):
        corrupt(name, points, 4, seed=0)


def test_mce_pools_severities_per_corruption_as_robo3d():
    from trainer.evaluate.robustness import summarise

    results = {"fog@1": {"miou": 0.5}, "fog@3": {"miou": 0.1},
               "jitter@1": {"miou": 0.6}, "jitter@3": {"miou": 0.4}}  # fmt: skip
    base = {"corruptions": {"fog@1": {"miou": 0.6}, "fog@3": {"miou": 0.0},
                            "jitter@1": {"miou": 0.5}, "jitter@3": {"miou": 0.5}}}  # fmt: skip
    s = summarise(results, 0.7, base)
    # CE_fog = (0.5 + 0.9) / (0.4 + 1.0) = 1.0; CE_jitter = (0.4 + 0.6) / (0.5 + 0.5) = 1.0.
    # The mean of the per-level ratios would be (1.25 + 0.9 + 0.8 + 1.2) / 4 = 1.0375.
    assert s["ce_per_corruption"] == pytest.approx({"fog": 1.0, "jitter": 1.0})
    assert s["mCE"] == pytest.approx(1.0)
    assert results["fog@1"]["ce"] == pytest.approx(1.25)  # one level's own ratio
    assert s["mRR"] == pytest.approx((0.5 + 0.1 + 0.6 + 0.4) / 4 / 0.7)
    plain = summarise({k: dict(v) for k, v in results.items()}, 0.7, None)
    assert plain["mCE"] == pytest.approx((0.5 + 0.9 + 0.4 + 0.6) / 4)
    assert plain["ce_per_corruption"] == pytest.approx({"fog": 0.7, "jitter": 0.5})


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_features_reach_miou_one():
    rng = np.random.default_rng(0)
    num_classes, dim = 4, 16
    centres = rng.normal(0, 5, (num_classes, dim))
    feats, labels = [], []
    for _ in range(3):  # three "scans"
        y = rng.integers(0, num_classes, 600).astype(np.uint8)
        y[:20] = 255  # ignored points must not matter
        x = centres[np.minimum(y, num_classes - 1)] + rng.normal(0, 0.3, (600, dim))
        feats.append(torch.tensor(x, dtype=torch.float16))
        labels.append(y)
    head = fit_linear_probe(
        feats[:2], labels[:2], num_classes, ProbeConfig(steps=150, batch_points=256)
    )
    conf = probe_confusion(head, feats[2], labels[2], num_classes)
    assert mean_iou(conf) > 0.99
    assert conf.sum() == (labels[2] != 255).sum()


def test_linear_probe_random_features_do_not_separate():
    rng = np.random.default_rng(1)
    feats = [torch.tensor(rng.normal(size=(800, 8)), dtype=torch.float32) for _ in range(2)]
    labels = [rng.integers(0, 4, 800).astype(np.uint8) for _ in range(2)]
    head = fit_linear_probe(feats[:1], labels[:1], 4, ProbeConfig(steps=60, batch_points=256))
    assert mean_iou(probe_confusion(head, feats[1], labels[1], 4)) < 0.3


# ---------------------------------------------------------------- fine-tuning subsets


def test_select_subset_deterministic_nested_and_nonempty():
    tokens = [f"scan{i:04d}" for i in range(200)]
    one = select_subset(tokens, 0.01, seed=0)
    five = select_subset(tokens, 0.05, seed=0)
    assert len(one) == 2 and len(five) == 10
    assert set(one) <= set(five)
    assert one == select_subset(list(reversed(tokens)), 0.01, seed=0)[::-1]  # order-independent
    assert select_subset(tokens, 0.05, seed=1) != five
    assert select_subset(tokens[:10], 0.01) and len(select_subset(tokens[:10], 0.01)) == 1
    assert select_subset(tokens, 1.0) == tokens
    # round(fraction * n), not its floor: 1.9 → 2 scans, 0.7 → 1, 4.75 → 5
    assert [len(select_subset(tokens[:n], f)) for n, f in ((19, 0.1), (70, 0.01), (19, 0.25))] == [
        2,
        1,
        5,
    ]
    assert set(select_subset(tokens[:19], 0.1)) <= set(select_subset(tokens[:19], 0.25))
    with pytest.raises(ValueError):
        select_subset(tokens, 0.0)


# ---------------------------------------------------------------- ablation helpers


def test_grid_parsing_product_and_names():
    from trainer.evaluate.ablate import grid_runs, parse_grid, run_name

    grid = parse_grid(["head=linear,mlp", "occupancy_weight=0,1", "epochs=2"])
    runs = grid_runs(grid)
    assert runs == [
        {"head": "linear", "occupancy_weight": "0", "epochs": "2"},
        {"head": "linear", "occupancy_weight": "1", "epochs": "2"},
        {"head": "mlp", "occupancy_weight": "0", "epochs": "2"},
        {"head": "mlp", "occupancy_weight": "1", "epochs": "2"},
    ]
    assert run_name(runs[1], grid) == "head=linear_occupancy_weight=1"  # fixed axes not in names
    with pytest.raises(ValueError, match="key=value"):
        parse_grid(["head"])


def test_apply_overrides_converts_to_field_types():
    from dataclasses import dataclass, field

    from trainer.evaluate.ablate import apply_overrides

    @dataclass(frozen=True)
    class Inner:
        width: int = 8

    @dataclass(frozen=True)
    class Cfg:
        head: str = "mlp"
        occupancy_weight: float = 1.0
        amp: bool = False
        limit: int | None = None
        inner: Inner = field(default_factory=Inner)

    cfg = apply_overrides(
        Cfg(),
        {
            "head": "linear",
            "occupancy_weight": "0",
            "amp": "true",
            "limit": "3",
            "inner.width": "16",
        },
    )
    assert cfg == Cfg("linear", 0.0, True, 3, Inner(16))
    assert isinstance(cfg.occupancy_weight, float)
    with pytest.raises(ValueError, match="unknown setting 'heads'"):
        apply_overrides(Cfg(), {"heads": "mlp"})
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(Cfg(), {"inner.width": "wide"})


def test_cache_fingerprint_detects_changes(tmp_path):
    import os
    import sys

    from trainer.evaluate.ablate import FORBIDDEN_MODULES, cache_fingerprint, check_cache_untouched

    # Other tests of this pytest process may have imported the teacher already.
    preloaded = frozenset(m for m in FORBIDDEN_MODULES if m in sys.modules)
    (tmp_path / "units").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "units" / "u00000.done").write_text("{}")
    (tmp_path / "units" / "shard").write_bytes(b"abc")
    before = cache_fingerprint(tmp_path)
    check_cache_untouched(before, tmp_path, "same", preloaded)  # nothing changed: no error
    st = os.stat(tmp_path / "units" / "shard")
    (tmp_path / "units" / "shard").write_bytes(b"abd")
    os.utime(tmp_path / "units" / "shard", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime
    (tmp_path / "units" / "u00000.done").write_text("{ }")
    with pytest.raises(RuntimeError, match="modified cache.*u00000.done"):
        check_cache_untouched(before, tmp_path, "r1", preloaded)


# ---------------------------------------------------------------- end to end (tiny backbone)


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_linear_probe_cli_random_tiny_backbone(synthetic_semantickitti, tmp_path):
    import json

    out = _cli(
        "evaluate", "linear-probe", "--checkpoint", "none", "--like", "tiny",
        "--data", str(synthetic_semantickitti), "--dataset", "semantickitti",
        "--steps", "100", "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "linear_probe.json").read_text())
    assert set(result["iou"]) == set(SK_CLASSES) and len(result["iou"]) == 19
    assert result["train_scans"] == 4 and result["val_scans"] == 2
    conf = np.array(result["confusion"])
    assert conf.shape == (19, 19) and conf.sum() > 1000  # every labelled val point counted once
    assert 0.0 < result["miou"] <= 1.0
    assert result["iou"]["road"] > 0.3  # the dominant class is found even by random features
    assert result["iou"]["bicycle"] is None  # absent from truth and prediction: not in the mean
    assert "mIoU" in out and "road" in out


def test_finetune_cli_writes_the_deterministic_subset(synthetic_semantickitti, tmp_path):
    import json

    from pipeline.datasets.semantickitti import SemanticKITTIReader

    _cli(
        "evaluate", "finetune", "--checkpoint", "none", "--like", "tiny",
        "--data", str(synthetic_semantickitti), "--dataset", "semantickitti",
        "--fraction", "0.25", "--epochs", "2", "--batch-scans", "1", "--out", str(tmp_path),
    )  # fmt: skip
    tokens = [s.token for s in SemanticKITTIReader(synthetic_semantickitti).scans("train")]
    listed = (tmp_path / "subset.txt").read_text().split()
    assert listed == select_subset(tokens, 0.25, seed=0) and len(listed) == 1
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert result["subset_scans"] == 1 and len(result["losses"]) == 2
    assert all(np.isfinite(result["losses"])) and result["backbone_lr"] == pytest.approx(1e-2)
    # it trains: measured 2.08 -> 1.85; without optimizer steps 2.08 -> 2.08 (augmentation only)
    assert result["losses"][1] < 0.95 * result["losses"][0], result["losses"]
    assert 0.0 <= result["miou"] <= 1.0

    # --subset: the listed scans (a published list, another run's subset.txt), in split order
    listing = tmp_path / "my_list.txt"
    listing.write_text(f"{tokens[2]}\n\n{tokens[0]}\n")
    base = ["evaluate", "finetune", "--checkpoint", "none", "--like", "tiny", "--dataset",
            "semantickitti", "--data", str(synthetic_semantickitti), "--epochs", "1"]  # fmt: skip
    _cli(*base, "--subset", str(listing), "--out", str(tmp_path / "listed"))
    assert (tmp_path / "listed" / "subset.txt").read_text().split() == [tokens[0], tokens[2]]
    listed_result = json.loads((tmp_path / "listed" / "finetune.json").read_text())
    assert listed_result["subset_scans"] == 2 and listed_result["fraction"] == 2 / len(tokens)
    listing.write_text(f"{tokens[0]}\nno-such-scan\n")
    from typer.testing import CliRunner

    from cli import app

    bad = CliRunner().invoke(app, [*base, "--subset", str(listing), "--out", str(tmp_path / "b")])
    assert bad.exit_code == 1 and "1 of its 2 tokens are not labelled scans of split 'train'" in (
        bad.output
    ), bad.output


def test_robustness_and_rankme_cli(synthetic_semantickitti, tmp_path):
    import json

    data = ["--data", str(synthetic_semantickitti), "--dataset", "semantickitti"]
    out = _cli(
        "evaluate", "robustness", "--checkpoint", "none", "--like", "tiny", *data,
        "--corruptions", "point_drop,jitter", "--severity", "1,3", "--beams", "16",
        "--max-val-scans", "1", "--probe-steps", "50", "--probe-lr", "0.02", "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "robustness.json").read_text())
    assert result["config"]["probe"]["lr"] == 0.02
    assert set(result["corruptions"]) == {"point_drop@1", "point_drop@3", "jitter@1", "jitter@3"}
    kept = {k: v["points_kept"] for k, v in result["corruptions"].items()}
    assert kept["jitter@3"] == 1.0 and 0.7 < kept["point_drop@1"] < 0.8
    assert 0.2 < kept["point_drop@3"] < 0.3
    for r in result["corruptions"].values():
        assert r["rr"] == pytest.approx(r["miou"] / result["clean_miou"])
    assert "mRR" in out
    # a baseline lacking a corruption asked for is refused before any work (no mixed mCE)
    from trainer.evaluate.backbone import EvalData
    from trainer.evaluate.robustness import RobustnessConfig, load_baseline

    asked = RobustnessConfig(
        checkpoint="none", like="tiny", out=tmp_path / "b", corruptions=("jitter", "fog"),
        severities=(1, 3), baseline=tmp_path / "robustness.json", beams=16,
        data=EvalData(root=synthetic_semantickitti, dataset="semantickitti", max_val_scans=1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="robustness.json lacks fog@1, fog@3"):
        load_baseline(asked)
    held = load_baseline(dataclasses.replace(asked, corruptions=("jitter",)))
    assert set(held["corruptions"]) >= {"jitter@1", "jitter@3"}
    # ... and measured on the same corrupted scans (CE divides by the baseline's errors)
    other = dataclasses.replace(asked, corruptions=("jitter",), seed=1, data=EvalData(
        root=synthetic_semantickitti, dataset="semantickitti", max_val_scans=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"other scans or corruptions: data.max_val_scans \(1 in "
                       r"the baseline, 2 here\), seed \(0 in the baseline, 1 here\)"):  # fmt: skip
        load_baseline(other)

    _cli(
        "evaluate",
        "rankme",
        "--checkpoint",
        "none",
        "--like",
        "tiny",
        *data,
        "--out",
        str(tmp_path),
    )
    rank = json.loads((tmp_path / "rankme.json").read_text())
    assert 1.0 <= rank["student"] <= rank["student_dim"] == 16


SK_CLASSES = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
)  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_cache(synthetic_nuscenes, tmp_path_factory):
    root, version = synthetic_nuscenes
    return _cache_for_synthetic(root, version, tmp_path_factory.mktemp("eval_cache"))


def _cache_for_synthetic(root, version, out, dim: int = 16):
    """A complete cache of the synthetic set's train split, written through the real CacheWriter
    and the real pairing: targets are a fixed function of each point's class and position."""
    from cache import CacheKey, CacheWriter, UnitData, dataset_fingerprint
    from pipeline.datasets.nuscenes import NuScenesReader
    from pipeline.pairing import PairingConfig, pair_points

    reader = NuScenesReader(root, version)
    scans = reader.scans("train")
    key = CacheKey(
        dataset_fingerprint=dataset_fingerprint(reader.metadata_files()), split="train",
        teacher="test-targets", teacher_weights_sha256="0" * 64, image_size=(28, 56),
        feature_layer="last", pairing='{"test": true}',
    )  # fmt: skip
    writer = CacheWriter.create(out, key, [[s.token for s in scans]], dim, meta={"test": True})
    basis = np.random.default_rng(0)
    class_vec, mix = basis.normal(size=(256, dim)), basis.normal(size=(3, dim))
    parts = {k: [] for k in ("points", "target", "camera", "uv", "label")}
    for scan in scans:
        pts, lab = reader.load_points(scan), reader.load_labels(scan)
        target = class_vec[lab] + 0.3 * np.tanh(pts[:, :3] / 10) @ mix
        parts["points"].append(pts)
        parts["target"].append(target.astype(np.float16))
        pairing = pair_points(pts[:, :3], scan, PairingConfig())
        parts["camera"].append(pairing.camera)
        parts["uv"].append(pairing.uv)
        parts["label"].append(lab)
    writer.write_unit(
        0,
        UnitData(
            tokens=[s.token for s in scans], lidar_paths=[s.lidar_path for s in scans], **parts
        ),
    )
    writer.finalize({"test": True})
    return writer.path


@pytest.mark.slow
def test_ablate_two_configs_from_one_cache(synthetic_nuscenes, synthetic_cache, tmp_path):
    """Real CLI in a fresh process: 2 train runs + probes from one cache, table rows as expected,
    cache files untouched, teacher never imported (ablate itself checks both after each run)."""
    import csv
    import json
    import subprocess
    import sys

    from trainer.evaluate.ablate import cache_fingerprint

    root, version = synthetic_nuscenes
    cache = synthetic_cache
    before = cache_fingerprint(cache)
    out = tmp_path / "ablate"
    cmd = [
        sys.executable, "cli.py", "ablate", "--cache", str(cache), "--data", str(root),
        "--version", version, "--out", str(out), "--probe-steps", "50", "--max-val-scans", "1",
        "--max-train-scans", "2",
        "--grid", "head=linear,mlp", "epochs=1", "batch_size=2", "backbone=tiny",
        "occupancy_weight=0", "workers=0", "progress=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cache_fingerprint(cache) == before
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == ["head=linear", "head=mlp"]
    assert [r["head"] for r in rows] == ["linear", "mlp"]
    assert all(r["epochs"] == "1" and 0 <= float(r["miou"]) <= 1 for r in rows)
    assert "iou_driveable_surface" in rows[0]
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | head |") and len(md) == 4
    for r in rows:
        assert (out / r["run"] / "checkpoint.pt").is_file()
        assert (out / r["run"] / "eval" / "linear_probe.json").is_file()
        rank = json.loads((out / r["run"] / "eval" / "rankme.json").read_text())
        assert 1.0 <= rank["student"] <= rank["student_dim"]
        assert float(r["rankme"]) == round(rank["student"], 2)


def test_visualize_writes_bev_and_camera_pictures(synthetic_nuscenes, synthetic_cache, tmp_path):
    from PIL import Image

    from cache.reader import open_cache

    root, version = synthetic_nuscenes
    reader = open_cache(synthetic_cache)
    token = reader.tokens[1]
    cameras = set(np.unique(reader.read_scan(1).camera).tolist()) - {-1}
    _cli(
        "visualize", "--checkpoint", "none", "--like", "tiny", "--cache", str(synthetic_cache),
        "--data", str(root), "--version", version, "--scan", token, "--out", str(tmp_path),
    )  # fmt: skip
    bev = np.asarray(Image.open(tmp_path / f"{token}_bev.png").convert("RGB"))
    assert bev.shape[1] > 1.5 * bev.shape[0]  # two panels side by side (no head without a run)
    assert len(np.unique(bev.reshape(-1, 3), axis=0)) > 50  # coloured points, not a blank figure
    pictures = sorted(p.name for p in tmp_path.glob(f"{token}_CAM_*.png"))
    assert len(pictures) == len(cameras) >= 1


def test_pca_colours_follow_the_basis():
    from trainer.evaluate.visualize import fit_pca, pca_rgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * [10, 5, 2, 0.1, 0.1, 0.1, 0.1, 0.1] + 3
    basis = fit_pca(x)
    rgb = pca_rgb(x, basis)
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(pca_rgb(x * 7.0, basis), rgb, atol=1e-9)  # scale-free (cosine)
    assert 0.2 < np.median(rgb[:, 0]) < 0.8  # stretched over the percentile range


def test_rankme_cli_with_cache_pairs_teacher_and_student(synthetic_cache, tmp_path):
    import json

    _cli(
        "evaluate", "rankme", "--checkpoint", "none", "--like", "tiny",
        "--cache", str(synthetic_cache), "--max-points", "3000", "--out", str(tmp_path),
    )  # fmt: skip
    r = json.loads((tmp_path / "rankme.json").read_text())
    assert r["teacher_dim"] == 16 and r["student_dim"] == 16 and r["paired_points"] > 100
    # targets = one vector per class + a small smooth term: effective rank well below 16 but > 2
    assert 2.0 < r["teacher_paired"] < 16.0
    assert 1.0 <= r["student_paired"] <= 16.0 and 1.0 <= r["student"] <= 16.0


def test_ring_ids_come_from_the_nuscenes_files(synthetic_nuscenes, synthetic_semantickitti):
    from pipeline.datasets.nuscenes import NuScenesReader
    from pipeline.datasets.semantickitti import SemanticKITTIReader
    from trainer.evaluate.robustness import ring_ids

    root, version = synthetic_nuscenes
    reader = NuScenesReader(root, version)
    scan = reader.scans("val")[0]
    points = reader.load_points(scan)
    ring = ring_ids(reader, scan, points, 32)
    assert ring is not None and ring.shape == (len(points),) and len(np.unique(ring)) > 16
    out = corrupt("fewer_beams", points, 1, seed=0, beam=ring)
    assert set(np.unique(ring[out.index]).tolist()) == {
        r for r in np.unique(ring).tolist() if r % 2 == 0
    }
    assert ring_ids(SemanticKITTIReader(synthetic_semantickitti), scan, points, 64) is None
    # (KITTI files carry no ring: elevation bins instead)
    # ids that cannot be the rings of the sensor, or not one per point: elevation bins instead
    top = int(ring.max())
    assert np.array_equal(ring_ids(reader, scan, points, top + 1), ring)
    assert ring_ids(reader, scan, points, top) is None  # an id == beams is no ring of it
    assert ring_ids(reader, scan, points[:-1], 32) is None


def test_cli_bad_input_is_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    no_out = runner.invoke(
        app, ["evaluate", "linear-probe", "--checkpoint", "none", "--data", str(tmp_path)]
    )
    assert no_out.exit_code == 1 and "needs --out" in no_out.output
    missing = runner.invoke(
        app,
        ["evaluate", "rankme", "--checkpoint", "none", "--data", str(tmp_path), "--dataset",
         "semantickitti", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert missing.exit_code == 1 and "not a SemanticKITTI root" in missing.output


def test_robustness_records_where_the_beams_came_from(synthetic_nuscenes, tmp_path):
    """nuScenes scans whose ring ids are unusable fall back to elevation bins, and the result
    says so (it used to say "ring channel" for any nuScenes run). Real files: a symlinked copy
    of the set whose chosen val lidar files carry one ring id for every point."""
    import os
    import shutil
    from pathlib import Path

    from pipeline.datasets.nuscenes import POINT_DIMS, NuScenesReader
    from trainer.evaluate import robustness
    from trainer.evaluate.backbone import EvalData

    root, version = synthetic_nuscenes

    def run(out, flat=()):
        data_root = out / "data"
        shutil.copytree(root, data_root, copy_function=os.symlink)
        data = EvalData(root=data_root, version=version, max_train_scans=1, max_val_scans=2)
        val = data.val_scans(NuScenesReader(data_root, version))  # the 2 scans evaluated
        for j in flat:  # this val scan's ring column is all 0: unusable
            path = Path(val[j].lidar_path)
            assert path.is_relative_to(data_root) and path.is_symlink()  # not the shared set
            raw = np.fromfile(path, np.float32).reshape(-1, POINT_DIMS)
            raw[:, 4] = 0
            path.unlink()
            raw.tofile(path)
        cfg = robustness.RobustnessConfig(
            checkpoint="none", like="tiny", data=data, out=out, corruptions=("fewer_beams",),
            severities=(1,), probe=ProbeConfig(steps=5), points_per_scan=200,
        )  # fmt: skip
        return robustness.run_robustness(cfg)["ring_source"]

    assert run(tmp_path / "rings") == "ring channel"
    assert run(tmp_path / "bins", flat=(0, 1)) == "elevation bins (32)"
    assert run(tmp_path / "mixed", flat=(1,)) == (
        "ring channel (1 of 2 scans), elevation bins (32) (1 of 2 scans)"
    )


GRID = ("head=linear,mlp", "epochs=1")  # run folders head=linear, head=mlp


def _ablate_cfg(synthetic_nuscenes, cache, out, *grid, **kw):
    from trainer.evaluate.ablate import AblateConfig

    root, version = synthetic_nuscenes
    fixed = ("batch_size=2", "backbone=tiny", "occupancy_weight=0", "workers=0", "progress=false")
    settings = dict(probe_steps=5, max_train_scans=1, max_val_scans=1) | kw
    return AblateConfig(
        cache=cache, data=root, out=out, version=version, grid=(*grid, *fixed), **settings
    )


@pytest.fixture(scope="module")
def finished_ablation(synthetic_nuscenes, synthetic_cache, tmp_path_factory):
    """An ablation folder of two finished runs (head=linear,mlp, epochs=1), its table rows."""
    from trainer.evaluate.ablate import run_ablation

    out = tmp_path_factory.mktemp("ablation") / "abl"
    rows = run_ablation(_ablate_cfg(synthetic_nuscenes, synthetic_cache, out, *GRID))
    return out, rows


def _written(folder):
    """{file: (inode, mtime)} under ``folder``: a file written again (our writes are temp file +
    rename) gets another inode, so a step that ran again shows, without replacing our code."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_ablate_reuses_only_results_made_with_the_same_settings(
    synthetic_nuscenes, synthetic_cache, finished_ablation, tmp_path
):
    """One-valued axes are not in the run names: a rerun with epochs=2 (or other probe settings)
    finds the folders of epochs=1 and is refused, naming them and the keys, before running
    anything. The same command reuses everything (in a moved folder too)."""
    import shutil

    from trainer.evaluate.ablate import run_ablation

    out = shutil.copytree(finished_ablation[0], tmp_path / "abl")
    runs = {r["run"]: _written(out / r["run"]) for r in finished_ablation[1]}
    rows = run_ablation(_ablate_cfg(synthetic_nuscenes, synthetic_cache, out, *GRID))
    assert [(r["run"], r["miou"]) for r in rows] == [
        (r["run"], r["miou"]) for r in finished_ablation[1]
    ]
    assert {name: _written(out / name) for name in runs} == runs  # nothing trained or probed
    for r in rows:  # one epoch: the mean of every logged distillation loss
        logged = (out / r["run"] / "metrics.jsonl").read_text().splitlines()
        distill = [json.loads(line)["distill"] for line in logged]
        assert r["distill_last_epoch"] == pytest.approx(np.mean(distill), abs=1e-5)
    assert "distill_last_epoch" in (out / "results.md").read_text().splitlines()[0]
    run = out / rows[0]["run"]
    with pytest.raises(ValueError, match="other settings") as e:
        run_ablation(_ablate_cfg(synthetic_nuscenes, synthetic_cache, out, GRID[0], "epochs=2"))
    assert f"{run / 'config.yaml'} (training): epochs (1 -> 2)" in str(e.value)
    with pytest.raises(ValueError, match="other settings") as e:
        cfg = _ablate_cfg(synthetic_nuscenes, synthetic_cache, out, *GRID, probe_steps=6)
        run_ablation(cfg)
    assert f"{run / 'eval' / 'linear_probe.json'}: probe.steps (5 -> 6)" in str(e.value)
    assert "config.yaml" not in str(e.value)
    with pytest.raises(ValueError, match=r"data.max_val_scans \(1 -> 2\)"):
        cfg = _ablate_cfg(synthetic_nuscenes, synthetic_cache, out, *GRID, max_val_scans=2)
        run_ablation(cfg)


def test_ablate_rerun_after_a_kill_finishes_without_retraining(
    synthetic_nuscenes, synthetic_cache, finished_ablation, tmp_path
):
    """Killed during the probe (summary, no probe result): the rerun probes, it does not train
    again (it used to call train without resume and fail on the existing checkpoint). Killed
    between the last checkpoint and the summary: the rerun resumes, which trains nothing."""
    import shutil

    from trainer.evaluate.ablate import run_ablation

    out = shutil.copytree(finished_ablation[0], tmp_path / "abl")
    run = out / finished_ablation[1][0]["run"]
    (run / "eval" / "linear_probe.json").unlink()
    (run / "eval" / "rankme.json").unlink()
    trained = {k: v for k, v in _written(run).items() if not k.startswith("eval/")}
    rows = run_ablation(_ablate_cfg(synthetic_nuscenes, synthetic_cache, out, *GRID))
    assert {k: v for k, v in _written(run).items() if not k.startswith("eval/")} == trained
    assert rows[0]["miou"] == pytest.approx(finished_ablation[1][0]["miou"])
    assert rows[0]["rankme"] == finished_ablation[1][0]["rankme"]

    (run / "summary.json").unlink()
    checkpoint = (run / "checkpoint.pt").read_bytes()
    probed = {k: v for k, v in _written(run).items() if k.startswith("eval/")}
    rows = run_ablation(_ablate_cfg(synthetic_nuscenes, synthetic_cache, out, *GRID))
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert {k: v for k, v in _written(run).items() if k.startswith("eval/")} == probed
    assert rows[0]["final_loss"] == finished_ablation[1][0]["final_loss"]


def test_results_record_the_checkpoint_step_and_warn_on_an_unfinished_run(
    synthetic_nuscenes, finished_ablation, tmp_path, capsys
):
    """Each evaluation JSON records the step its checkpoint holds and the run's total; a run that
    has not reached its last step (still training, or killed) is named on stderr."""
    import shutil

    import yaml

    from trainer.evaluate.backbone import EvalData
    from trainer.evaluate.rankme import RankMeConfig, run_rankme

    out, rows = finished_ablation
    finished = out / rows[0]["run"]
    steps = json.loads((finished / "summary.json").read_text())["steps"]
    probe = json.loads((finished / "eval" / "linear_probe.json").read_text())
    assert (probe["checkpoint_step"], probe["run_steps"]) == (steps, steps)

    unfinished = shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    record = yaml.safe_load((unfinished / "config.yaml").read_text())
    record["steps"] = steps + 6  # the same checkpoint, as if the run were to train 6 more steps
    (unfinished / "config.yaml").write_text(yaml.safe_dump(record))
    root, version = synthetic_nuscenes
    data = EvalData(root=root, version=version, max_val_scans=1)
    capsys.readouterr()
    result = run_rankme(RankMeConfig(checkpoint=str(unfinished), data=data, max_points=500))
    assert (result["checkpoint_step"], result["run_steps"]) == (steps, steps + 6)
    err = capsys.readouterr().err
    assert f"{unfinished / 'checkpoint.pt'} holds step {steps} of {steps + 6}" in err


def test_val_scans_that_are_training_scans_are_warned_about(synthetic_nuscenes, capsys):
    from trainer.evaluate.backbone import EvalData, open_reader

    root, version = synthetic_nuscenes
    held_out = EvalData(root=root, version=version)
    reader = open_reader(held_out)
    val = held_out.val_scans(reader)
    assert val and "warning" not in capsys.readouterr().err
    same = EvalData(root=root, version=version, train_split="val")
    assert [s.token for s in same.val_scans(reader)] == [s.token for s in val]
    err = capsys.readouterr().err
    assert f"warning: {len(val)} of the {len(val)} val scans ('val') are in the training" in err


def test_export_writes_the_backbone_that_evaluation_and_plain_torch_load(
    synthetic_nuscenes, finished_ablation, tmp_path, capsys
):
    """`cli.py export`: the run's backbone weights bit for bit, no head or optimiser, readable
    with torch.load(weights_only=True); the evaluation protocols take the file as --checkpoint
    and measure the same features as from the run folder; an existing file is never replaced."""
    from typer.testing import CliRunner

    from cli import app
    from trainer.evaluate.backbone import EvalData, load_model, scan_features
    from trainer.evaluate.rankme import RankMeConfig, run_rankme
    from trainer.export import FORMAT, read_exported
    from trainer.model import load_checkpoint

    out, rows = finished_ablation
    run = out / rows[0]["run"]
    steps = json.loads((run / "summary.json").read_text())["steps"]
    exported = tmp_path / "nested" / "backbone.pt"
    assert f"(step {steps}) -> {exported}" in _cli(
        "export", "--checkpoint", str(run), "--out", str(exported)
    )

    plain = torch.load(exported, map_location="cpu", weights_only=True)
    assert plain["format"] == FORMAT and plain["format_version"] == 1
    assert set(plain) == {
        "format",
        "format_version",
        "architecture",
        "input",
        "state_dict",
        "provenance",
    }
    assert plain["architecture"] == {
        "name": "tiny", "stem": 8, "widths": [8, 16, 16, 32, 16, 16, 16, 16],
        "depths": [1] * 8, "in_channels": 2, "out_channels": 16,
    }  # fmt: skip
    assert plain["input"]["voxel_size"] == 0.1 and plain["input"]["intensity_scale"] == 1 / 255
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    backbone = checkpoint["model"]["backbone"]
    assert list(plain["state_dict"]) == list(backbone)
    assert all(torch.equal(plain["state_dict"][k], v) for k, v in backbone.items())
    provenance = plain["provenance"]
    assert (provenance["step"], provenance["steps"]) == (steps, steps)
    assert provenance["cache_digest"] == checkpoint["cache_digest"]
    assert provenance["cache_key"]["split"] == "train" and provenance["head"] == "linear"

    root, version = synthetic_nuscenes
    from pipeline.datasets.nuscenes import NuScenesReader

    reader = NuScenesReader(root, version)
    points = reader.load_points(reader.scans("val")[0])
    from_file = scan_features(load_model(str(exported), None, "cpu"), points, "cpu")
    from_run = scan_features(load_model(str(run), None, "cpu"), points, "cpu")
    assert from_file.shape == (len(points), 16) and torch.equal(from_file, from_run)
    # --checkpoint none --like FILE: the file's architecture at random init, as --like RUN_DIR
    like_file = scan_features(load_model("none", exported, "cpu", seed=3), points, "cpu")
    like_run = scan_features(load_model("none", run, "cpu", seed=3), points, "cpu")
    assert torch.equal(like_file, like_run) and not torch.equal(like_file, from_run)

    data = EvalData(root=root, version=version, max_val_scans=1)
    with pytest.raises(ValueError, match="needs --out"):  # no run folder to write into
        RankMeConfig(checkpoint=str(exported), data=data)
    by_file = run_rankme(
        RankMeConfig(checkpoint=str(exported), data=data, max_points=500, out=tmp_path / "r1")
    )
    by_run = run_rankme(
        RankMeConfig(checkpoint=str(run), data=data, max_points=500, out=tmp_path / "r2")
    )
    assert by_file["student"] == by_run["student"] > 1.0
    assert (by_file["checkpoint_step"], by_file["run_steps"]) == (steps, steps)

    before = exported.read_bytes()
    again = CliRunner().invoke(app, ["export", "--checkpoint", str(run), "--out", str(exported)])
    assert again.exit_code == 1 and f"{exported}: already exists" in again.output
    assert exported.read_bytes() == before
    assert [p.name for p in exported.parent.iterdir()] == ["backbone.pt"]  # no temp file left

    # what is not an export is named: a training checkpoint, a torn file, a newer format
    with pytest.raises(ValueError, match="checkpoint.pt: a training checkpoint, not an exported"):
        read_exported(run / "checkpoint.pt")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="torn.pt: not an exported backbone"):
        load_model(str(torn), None, "cpu")
    newer = tmp_path / "newer.pt"
    torch.save({**plain, "format_version": 2}, newer)
    with pytest.raises(ValueError, match="newer.pt: exported backbone format_version 2"):
        read_exported(newer)
    other = tmp_path / "other.pt"
    torch.save({**plain, "architecture": {**plain["architecture"], "widths": [9] * 8}}, other)
    with pytest.raises(ValueError, match="other.pt: exported backbone does not load"):
        load_model(str(other), None, "cpu")


def test_export_refuses_weights_that_do_not_fit_the_recorded_architecture(
    finished_ablation, tmp_path
):
    import shutil

    import yaml

    from trainer.export import export_backbone

    out, rows = finished_ablation
    run = shutil.copytree(out / rows[0]["run"], tmp_path / "run")
    record = yaml.safe_load((run / "config.yaml").read_text())
    record["config"]["backbone"] = "minkunet34"  # the checkpoint holds a tiny backbone
    (run / "config.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(ValueError, match="checkpoint.pt: the backbone weights do not fit"):
        export_backbone(run, tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
    with pytest.raises(ValueError, match=r"b\.bin: the exported file is a torch file"):
        export_backbone(out / rows[0]["run"], tmp_path / "b.bin")

    # a run that has not reached its last step is exported, saying so, its step recorded
    from typer.testing import CliRunner

    from cli import app

    unfinished = shutil.copytree(out / rows[0]["run"], tmp_path / "unfinished")
    record = yaml.safe_load((unfinished / "config.yaml").read_text())
    steps = record["steps"]
    record["steps"] = steps + 6
    (unfinished / "config.yaml").write_text(yaml.safe_dump(record))
    said = CliRunner().invoke(
        app, ["export", "--checkpoint", str(unfinished), "--out", str(tmp_path / "u.pt")]
    )
    assert said.exit_code == 0
    assert f"{unfinished / 'checkpoint.pt'} holds step {steps} of {steps + 6}" in said.output
    provenance = torch.load(tmp_path / "u.pt", weights_only=True)["provenance"]
    assert (provenance["step"], provenance["steps"]) == (steps, steps + 6)
