"""Reliability (issue 8): damaged caches at training time, bad dataset files at extraction time,
two extraction runs at once, and a full disk. Real processes, real files (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cache import CacheError, open_cache, verify_cache
from cache.store import unit_problems
from pipeline.datasets import DataError, NuScenesReader
from pipeline.extract import ExtractConfig, extract_teacher
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
SPLIT = "val"  # 4 scans of the synthetic set
TRAIN_SMALL = dict(backbone="tiny", batch_size=2, epochs=1, progress=False, workers=0, threads=1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _markers(path: str | Path) -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text())["arrays"]
        for p in sorted(Path(path, "units").glob("*.done"))
    }


@pytest.fixture(scope="module")
def extract_cfg(synthetic_nuscenes, tiny_teacher: Path, tmp_path_factory) -> ExtractConfig:
    """Tiny extraction settings: 56x98 images, one scan per unit, one thread worker."""
    return ExtractConfig(
        data=synthetic_nuscenes.root,
        version=synthetic_nuscenes.version,
        cache_root=tmp_path_factory.mktemp("reference"),
        teacher=str(tiny_teacher),
        split=SPLIT,
        image_size=(56, 98),
        n_workers=1,
        processes=False,
        scans_per_unit=1,
        progress=False,
    )


@pytest.fixture(scope="module")
def reference(extract_cfg: ExtractConfig) -> Path:
    """The uninterrupted run every recovered cache must equal (per-file checksums)."""
    return Path(extract_teacher(extract_cfg).cache_path)


# ---------------------------------------------------------------- corrupted cache → train ----
def _damaged_copy(cache: Path, where: Path, damage: str) -> Path:
    """A copy of ``cache`` with unit u00001 damaged ("truncate", "flip" or "missing")."""
    copy = where / cache.name
    shutil.copytree(cache, copy)
    shard = copy / "units" / "u00001" / "target" / "c" / "0" / "0"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "missing":
        shutil.rmtree(copy / "units" / "u00001")
    return copy


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_train_refuses_a_structurally_damaged_cache(train_cache, tmp_path, damage) -> None:
    """A truncated shard or a lost unit folder is found by the default (cheap) check: refused
    naming the unit, before any file of the run is written."""
    bad = _damaged_copy(train_cache.cache, tmp_path, damage)
    cfg = load_config(cache=bad, data=train_cache.data, out=tmp_path / "run", **TRAIN_SMALL)
    with pytest.raises(CacheError, match="fails verification .*unit u00001"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_flipped_byte_needs_verify_cache_and_skip_bad_scans_trains_on_the_rest(
    train_cache, tmp_path
) -> None:
    """A flipped byte keeps the file size: `--verify-cache` (all checksums) refuses the cache
    naming the unit; `--skip-bad-scans` trains on the 4 scans of the good unit and says so."""
    bad = _damaged_copy(train_cache.cache, tmp_path, "flip")
    cfg = load_config(
        cache=bad, data=train_cache.data, out=tmp_path / "a", verify_cache=True, **TRAIN_SMALL
    )
    with pytest.raises(CacheError, match="unit u00001: file target/c/0/0 checksum mismatch"):
        train(cfg)
    assert not (tmp_path / "a").exists()
    # through the CLI: --verify-cache --skip-bad-scans → trains without unit 1's 4 scans
    cli = [sys.executable, str(REPO / "cli.py"), "train", "--cache", str(bad),
           "--data", str(train_cache.data), "--out", str(tmp_path / "b"), "--backbone", "tiny",
           "--batch-size", "2", "--epochs", "1", "--workers", "0", "--threads", "1",
           "--no-progress", "--verify-cache", "--skip-bad-scans"]  # fmt: skip
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping 4 of 8 scans" in done.stderr and "u00001" in done.stderr
    record = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert record["cache"]["scans"] == 4 and record["cache"]["skipped_scans"] == 4
    assert record["steps"] == 2  # 4 scans, batch 2, 1 epoch
    assert "trained 2 steps" in done.stdout


@pytest.mark.slow
def test_ddp_processes_each_check_a_share_of_the_units_and_agree(train_cache, tmp_path) -> None:
    """--verify-cache under DDP: each process checksums every world-th unit (the cache is read
    once in all, not once per process) and the findings are exchanged: rank 0, which never
    reads unit 1, leaves out its scans like rank 1 and the two train the same steps."""
    from test_train import _spawn_ddp

    from trainer.data import unit_problems_share

    bad = _damaged_copy(train_cache.cache, tmp_path, "flip")
    reader = open_cache(bad)
    assert unit_problems_share(reader, True, rank=0, world=2) == {0: []}
    (problem,) = unit_problems_share(reader, True, rank=1, world=2)[1]
    assert "unit u00001: file target/c/0/0 checksum mismatch" in problem
    assert unit_problems_share(reader, False, rank=1, world=2) == {1: []}  # same size
    cfg = load_config(
        cache=bad, data=train_cache.data, out=tmp_path / "run", verify_cache=True,
        skip_bad_scans=True, **TRAIN_SMALL,
    )  # fmt: skip
    (tmp_path / "ranks").mkdir()
    outcomes = _spawn_ddp(cfg, tmp_path / "ranks")
    assert outcomes[0] == outcomes[1] and outcomes[0]["steps"] == 1, outcomes  # 4 scans / (2 x 2)
    record = yaml.safe_load((cfg.out / "config.yaml").read_text())
    assert record["cache"]["scans"] == 4 and record["cache"]["skipped_scans"] == 4


# ---------------------------------------------------------------- bad dataset files → extract ----
@pytest.fixture
def damaged_data(synthetic_nuscenes, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A symlinked copy of the synthetic set with 3 of the 4 val scans damaged, one way each:
    truncated lidar file, missing camera image, label file of the wrong length.
    Returns (root, {token: damaged file})."""
    root = tmp_path / "nuscenes"
    shutil.copytree(synthetic_nuscenes.root, root, copy_function=os.symlink)
    scans = NuScenesReader(root, synthetic_nuscenes.version).scans(SPLIT)
    damaged = {}
    lidar = Path(scans[0].lidar_path)
    data = lidar.read_bytes()
    lidar.unlink()
    lidar.write_bytes(data[:-7])
    damaged[scans[0].token] = str(lidar)
    image = Path(scans[1].cameras[3].image_path)
    image.unlink()
    damaged[scans[1].token] = str(image)
    label = Path(scans[3].label_path)
    data = label.read_bytes()
    label.unlink()
    label.write_bytes(data[:-1])
    damaged[scans[3].token] = str(label)
    return root, damaged


def test_bad_scans_fail_before_any_work_or_are_skipped_and_listed(
    extract_cfg, reference, damaged_data, tmp_path
) -> None:
    root, damaged = damaged_data
    cfg = replace(extract_cfg, data=root, cache_root=tmp_path / "cache")
    with pytest.raises(DataError) as error:
        extract_teacher(cfg)
    message = str(error.value)
    assert "3 of 4 scans" in message and "--skip-bad" in message
    for path in damaged.values():
        assert path in message  # each damaged file named
    assert "truncated lidar file" in message and "image file missing" in message
    assert "labels for" in message
    assert not (tmp_path / "cache").exists()  # nothing written, no teacher work
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, [
        "extract-teacher", "--data", str(root), "--version", cfg.version,
        "--cache", str(tmp_path / "cli"), "--teacher", cfg.teacher, "--split", SPLIT,
        "--image-size", "56x98", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 1 and "error: 3 of 4 scans" in result.output, result.output
    assert all(path in result.output for path in damaged.values())
    assert not (tmp_path / "cli").exists()

    summary = extract_teacher(replace(cfg, skip_bad=True))
    assert summary.scans == 1 and summary.scans_skipped == 3 and summary.units == 1
    cache = open_cache(summary.cache_path)
    skipped = cache.meta["skipped_scans"]
    assert {s["token"] for s in skipped} == set(damaged)
    for s in skipped:
        assert any(damaged[s["token"]] in p for p in s["problems"])
    assert not set(cache.tokens) & set(damaged) and len(cache) == 1
    assert cache.verify(progress=False) == []
    # the kept scan's unit is the same bytes as in the clean run (its unit 2 there)
    ref = json.loads(Path(reference, "units", "u00002.done").read_text())["arrays"]
    assert _markers(summary.cache_path) == {"u00000.done": ref}


# ---------------------------------------------------------------- two runs at once ----
def _extract_cli(cfg: ExtractConfig) -> list[str]:
    h, w = cfg.image_size
    return [
        sys.executable, str(REPO / "cli.py"), "extract-teacher",
        "--data", str(cfg.data), "--version", cfg.version, "--cache", str(cfg.cache_root),
        "--teacher", cfg.teacher, "--split", cfg.split, "--image-size", f"{h}x{w}",
        "--scans-per-unit", str(cfg.scans_per_unit), "--workers", "1", "--threads",
        "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_second_concurrent_run_is_refused_by_the_lock(extract_cfg, reference, tmp_path) -> None:
    """Two extract-teacher processes on one cache key. The first is pointed at a Dask cluster
    with no worker yet, so it holds the cache's lock while it waits; the second exits 1 naming
    the holder's pid; given a worker, the first finishes with the reference's bytes."""
    import logging

    from dask.distributed import LocalCluster

    cfg = replace(extract_cfg, cache_root=tmp_path)
    with LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster:  # fmt: skip
        first = subprocess.Popen(
            [*_extract_cli(cfg), "--scheduler", cluster.scheduler_address],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/writer.lock")) and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        second = subprocess.run(_extract_cli(cfg), cwd=REPO, capture_output=True, text=True)
        assert first.poll() is None  # still waiting for a worker, still holding the lock
        cluster.scale(1)
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1, second.stdout + second.stderr[-3000:]
    assert second.stderr.startswith("error:") and "lock" in second.stderr
    assert str(first.pid) in second.stderr, second.stderr
    (path,) = tmp_path.iterdir()
    assert not (path / "writer.lock").exists()
    assert _markers(path) == _markers(reference)


# ---------------------------------------------------------------- disk full ----
@pytest.fixture
def small_disk(tmp_path: Path):
    """A real tmpfs of 9 MiB (needs root; skipped where mount is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_clearly_keeps_finished_units_and_rerun_completes(
    extract_cfg, reference, small_disk
) -> None:
    """ENOSPC on a real 9 MiB tmpfs: the run stops with the OS error, every unit marked done is
    intact, nothing is finalized; with room again the re-run writes only the rest, and the cache
    equals the uninterrupted one."""
    sizes = [json.loads(p.read_text())["bytes"] for p in reference.glob("units/*.done")]
    assert 2 * max(sizes) < 9 << 20 < 3 * min(sizes), sizes  # room for 2 units of 4
    cfg = replace(extract_cfg, cache_root=small_disk)
    with pytest.raises(RuntimeError, match="No space left on device") as error:
        extract_teacher(cfg)
    assert "re-run to resume" in str(error.value)
    (path,) = small_disk.iterdir()
    done = sorted(path.glob("units/*.done"))
    assert len(done) == 2
    units = json.loads((path / "manifest.json").read_text())["units"]
    for marker in done:  # no unit marked complete that is not
        u = int(marker.name[1:6])
        assert unit_problems(path, u, units[u], checksums=True) == []
    assert not (path / "COMPLETE").exists() and not (path / "writer.lock").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = extract_teacher(cfg)
    assert resumed.units_skipped == len(done) and resumed.units_computed == 4 - len(done)
    assert verify_cache(path, progress=False) == []
    assert _markers(path) == _markers(reference)
    a, b = open_cache(path), open_cache(reference)
    for i in range(len(a)):
        assert np.array_equal(a.read_scan(i).target, b.read_scan(i).target)
