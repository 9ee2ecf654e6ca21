"""pipeline/extract.py: Dask extraction into the cache, against direct recomputation and itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import IncompleteCacheError, open_cache
from cache.sampling import sample_features
from pipeline.datasets import NuScenesReader
from pipeline.extract import (
    ClusterLayout,
    ExtractConfig,
    default_layout,
    extract_teacher,
    teacher_key_name,
)
from pipeline.teacher import Teacher, TeacherConfig

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (56, 98)  # tiny: 4 x 7 patches; keeps the tests in seconds
SPLIT = "val"  # the last scene of the synthetic set: 4 scans


@pytest.fixture(scope="module")
def serial(synthetic_nuscenes, tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory):
    """One extraction with a single thread worker: 2 units of 2 scans, 3 forwards of 4 images each."""
    cfg = ExtractConfig(
        data=synthetic_nuscenes.root,
        version=synthetic_nuscenes.version,
        cache_root=tmp_path_factory.mktemp("cache-serial"),
        teacher=str(tiny_teacher),
        split=SPLIT,
        image_size=IMAGE_SIZE,
        n_workers=1,
        processes=False,
        batch_size=4,  # not a multiple of 6: batches straddle scans
        scans_per_unit=2,
        progress=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(7)  # the thread worker sets its own count; ours must come back
    try:
        summary = extract_teacher(cfg)
        assert torch.get_num_threads() == 7
    finally:
        torch.set_num_threads(threads)
    return cfg, summary


def _arrays(path: str | Path) -> list[dict[str, np.ndarray]]:
    reader = open_cache(path)
    fields = ("points", "target", "camera", "uv", "label")
    return [
        {"token": np.array(s.token), **{f: getattr(s, f) for f in fields}}
        for s in (reader.read_scan(i) for i in range(len(reader)))
    ]


def _markers(path: str | Path) -> dict[str, dict]:
    """Per unit: the digest of each array (over its files' checksums), from the .done markers."""
    return {
        p.name: json.loads(p.read_text())["arrays"]
        for p in sorted(Path(path, "units").glob("*.done"))
    }


def test_summary_counts_what_was_written(serial, synthetic_nuscenes) -> None:
    cfg, summary = serial
    reader = NuScenesReader(*synthetic_nuscenes)
    scans = reader.scans(SPLIT)
    cache = open_cache(summary.cache_path)
    assert cache.tokens == [s.token for s in scans]
    assert summary.scans == len(scans) == 4
    assert summary.images == 6 * len(scans)
    assert summary.units == 2 and summary.units_computed == 2 and summary.units_skipped == 0
    assert summary.teacher_forwards == 2 * 3  # batches of 4 straddle the 2 scans of a unit
    assert summary.points == sum(len(reader.load_points(s)) for s in scans)
    assert summary.points_paired == sum(
        int((s["camera"] >= 0).sum()) for s in _arrays(summary.cache_path)
    )
    assert 0 < summary.points_paired < summary.points
    assert summary.teacher_random is True and summary.scans_unlabelled == 0
    assert set(summary.step_s) == {"pair_s", "image_wait_s", "teacher_s", "write_s"}
    assert all(v >= 0 for v in summary.step_s.values()) and summary.step_s["teacher_s"] > 0
    # start-up (cluster + every worker's teacher) is reported apart from the throughput clock
    assert summary.startup_s > 0 and summary.compute_s > 0
    assert summary.wall_s > summary.startup_s + summary.compute_s
    start, end = summary.compute_window  # Unix times: the compute clock, shutdown not in it
    assert end - start == pytest.approx(summary.compute_s, abs=0.05)
    assert summary.steady_images_per_s == summary.images_per_s  # 2 units: no steady state
    assert cache.key.image_size == IMAGE_SIZE and cache.key.feature_layer == "last"
    assert cache.feature_dim == 64
    assert cache.verify(progress=False) == []


def test_scans_without_labels_are_counted_and_carry_ignore(serial, tmp_path: Path) -> None:
    import shutil

    cfg, _ = serial
    data = tmp_path / "data"
    shutil.copytree(cfg.data, data, copy_function=os.symlink)
    table = data / cfg.version / "lidarseg.json"
    records = json.loads(table.read_text())
    scan = NuScenesReader(cfg.data, cfg.version).scans(SPLIT)[1]
    kept = [r for r in records if r["filename"] != str(Path(scan.label_path).relative_to(cfg.data))]
    assert len(kept) == len(records) - 1
    table.unlink()
    table.write_text(json.dumps(kept))
    summary = extract_teacher(replace(cfg, data=data, cache_root=tmp_path / "cache"))
    assert summary.scans_unlabelled == 1 and "scans_unlabelled" in summary.to_dict()
    labels = _arrays(summary.cache_path)[1]["label"]
    assert (labels == 255).all() and len(labels) > 0


def test_the_recorded_git_sha_says_dirty_for_uncommitted_changes(tmp_path, monkeypatch) -> None:
    """The cache's meta names the code: HEAD's sha, "+dirty" with a tracked file changed (an
    untracked file is no change), "unknown" outside a git checkout. (A scratch repository,
    through git's own GIT_DIR / GIT_WORK_TREE.)"""
    from pipeline.extract import _git_sha

    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(repo))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    sha = git("rev-parse", "HEAD")
    assert len(sha) == 40 and _git_sha() == sha
    (repo / "new.py").write_text("y = 2\n")
    assert _git_sha() == sha  # untracked
    (repo / "a.py").write_text("x = 2\n")
    assert _git_sha() == f"{sha}+dirty"
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-repo"))
    assert _git_sha() == "unknown"


def test_code_identity_follows_the_files_a_process_imports(tmp_path) -> None:
    """What `--scheduler` compares: a process importing a byte-identical copy of the packages
    has this process's sha256; one where a file has another name (same bytes) has another;
    one that cannot import `cache` names it and has no sha256."""
    import shutil

    from pipeline.environment import code_identity

    def identity_from(root: Path) -> dict:
        script = "import json; from pipeline.environment import code_identity as c; print(json.dumps(c()))"
        env = {**os.environ, "PYTHONPATH": str(root)}
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    mine = code_identity()
    assert mine["packages"] == {p: str(REPO / p) for p in ("pipeline", "cache")}
    copies = {}
    for name in ("same", "renamed", "no-cache"):
        for package in ("pipeline", "cache") if name != "no-cache" else ("pipeline",):
            shutil.copytree(REPO / package, tmp_path / name / package,
                            ignore=shutil.ignore_patterns("__py*"))  # fmt: skip
        copies[name] = tmp_path / name
    (copies["renamed"] / "pipeline" / "outputs.py").rename(
        copies["renamed"] / "pipeline" / "outs.py"
    )
    same, renamed, no_cache = (identity_from(copies[n]) for n in ("same", "renamed", "no-cache"))
    assert same["sha256"] == mine["sha256"] and len(mine["sha256"]) == 64
    assert same["packages"]["pipeline"] == str(copies["same"] / "pipeline")
    assert renamed["sha256"] not in (None, mine["sha256"])
    assert no_cache["packages"] == {"pipeline": str(copies["no-cache"] / "pipeline"), "cache": None}
    assert no_cache["sha256"] is None


def test_workers_with_other_package_versions_are_named(tmp_path) -> None:
    """Each process reports the installed versions of the packages that shape the targets (from
    their metadata: a zarr 0.0.1 dist-info first on its path is what it has); workers that
    disagree are named per package, the versions they have; agreeing workers give no line."""
    from pipeline.environment import DISTRIBUTIONS, code_identity
    from pipeline.extract import version_differences

    fake = tmp_path / "old" / "zarr-0.0.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: zarr\nVersion: 0.0.1\n")
    script = (
        "import json; from pipeline.environment import code_identity as c; print(json.dumps(c()))"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'old'}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    old, mine = json.loads(done.stdout), code_identity()
    assert (
        set(mine["versions"]) == set(DISTRIBUTIONS)
        and mine["versions"]["torch"] == torch.__version__
    )
    assert old["versions"] == {**mine["versions"], "zarr": "0.0.1"}
    workers = {"worker a": mine, "worker b": mine, "worker c": old}
    assert version_differences(workers) == [
        f"zarr: {mine['versions']['zarr']} on worker a, worker b; 0.0.1 on worker c"
    ]
    assert version_differences({"worker a": mine, "worker b": mine}) == []


def test_steady_rate_leaves_out_ramp_and_tail() -> None:
    """20 units of 12 images: one every 0.1 s from t = 1.0 s (a slow start), the last two 2 s
    late (a tail): the steady rate is 120 images/s, the whole run's is lower."""
    from pipeline.extract import _steady_rate

    times = [1.0 + 0.1 * k for k in range(18)] + [4.0, 6.0]
    progress = [(t, 12 * (k + 1)) for k, t in enumerate(times)]
    assert _steady_rate(progress, 240, 6.0) == pytest.approx(120.0)
    assert _steady_rate(progress[:5], 60, 2.0) == 30.0  # < 10 units: the whole run's rate
    assert _steady_rate([], 0, 0.0) == 0.0


def test_finished_units_are_let_go_while_the_run_goes_on() -> None:
    """`_collect_units` drops each unit's future once the unit is done: a held future keeps its
    result on a worker (and its task on the scheduler) until the run ends, which grew each
    worker process by ~0.05 MB a unit (1596 units, 2 processes). When the driver checks unit k,
    no future of an earlier unit is alive any more."""
    import logging
    import weakref

    from dask.distributed import Client, LocalCluster

    from pipeline.extract import _collect_units, _no_units

    totals, step_s, _ = _no_units()
    stats = {**totals, **step_s}  # what a unit's task returns, as far as the driver reads it
    checked: list[int] = []
    held: list[list[int]] = []  # at each check, the earlier units whose future is still alive

    class Writer:
        path = Path("cache")

        def is_complete(self, unit: int) -> bool:
            held.append([u for u in checked if refs[u]() is not None])
            checked.append(unit)
            return True

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        futures = {client.submit(dict, stats, pure=False): u for u in range(8)}
        refs = {u: weakref.ref(f) for f, u in futures.items()}
        _, _, progress = _collect_units(client, futures, Writer(), 8, False, time.perf_counter())
    assert len(progress) == 8 and sorted(checked) == list(range(8))
    assert held == [[]] * 8


def _devkit_uv(nusc, sample_token: str, channel: str) -> np.ndarray:
    """(n, 2) pixel coordinates of the lidar points the official devkit projects into a camera."""
    sample = nusc.get("sample", sample_token)
    pts, _, _ = nusc.explorer.map_pointcloud_to_image(
        sample["data"]["LIDAR_TOP"], sample["data"][channel]
    )
    return pts[:2].T


def test_cached_targets_equal_teacher_at_devkit_pixels(
    serial, synthetic_nuscenes, tiny_teacher: Path
) -> None:
    """Target of a paired point = teacher forward on its image, bilinear at the devkit's pixel."""
    from nuscenes.nuscenes import NuScenes
    from scipy.spatial import cKDTree

    cfg, summary = serial
    reader = NuScenesReader(*synthetic_nuscenes)
    scan = reader.scans(SPLIT)[0]
    cached = open_cache(summary.cache_path).read_scan(0)
    assert np.array_equal(cached.points, reader.load_points(scan))
    assert np.array_equal(cached.label, reader.load_labels(scan))
    unpaired = cached.camera == -1
    assert unpaired.any() and not cached.target[unpaired].any()  # zeros, camera -1

    teacher = Teacher(TeacherConfig(str(tiny_teacher), image_size=IMAGE_SIZE))
    nusc = NuScenes(version=reader.version, dataroot=str(reader.root), verbose=False)
    checked = 0
    for c, frame in enumerate(scan.cameras):
        ours = cached.camera == c
        if not ours.any():
            continue
        devkit_uv = _devkit_uv(nusc, scan.token, frame.channel)
        dist, idx = cKDTree(devkit_uv).query(cached.uv[ours].astype(np.float64))
        # the devkit transforms float32 points in float32: ~1e-3 px from our float64 chain
        assert dist.max() < 1e-2, f"{frame.channel}: cached uv is not the devkit's projection"
        image = reader.load_image(frame)
        grid = teacher.patch_grid(image[None])[0]  # (D, h, w), batch of one
        want = sample_features(grid, devkit_uv[idx], image.shape[:2])  # (M, D)
        got = torch.from_numpy(cached.target[ours].astype(np.float32))
        assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)
        # and not trivially: features differ between points
        assert want.std(dim=0).mean() > 0.05
        checked += int(ours.sum())
    assert checked > 50


def test_a_dinov3_teacher_gives_its_patch_features_at_the_cached_pixels(
    synthetic_nuscenes, tmp_path: Path
) -> None:
    """DINOv3ViTModel (patch 16, 4 registers): the same extraction, targets = its grid sampled
    at each paired point's cached pixel, the teacher's architecture in the manifest."""
    from pipeline.teacher import save_random_teacher

    folder = save_random_teacher(tmp_path / "dinov3", family="dinov3")
    cfg = ExtractConfig(
        data=synthetic_nuscenes.root, version=synthetic_nuscenes.version,
        cache_root=tmp_path / "cache", teacher=str(folder), split=SPLIT, image_size=(64, 112),
        n_workers=1, processes=False, batch_size=6, scans_per_unit=2, progress=False,
    )  # fmt: skip
    summary = extract_teacher(cfg)
    manifest = json.loads((Path(summary.cache_path) / "manifest.json").read_text())
    assert manifest["meta"]["teacher"]["architecture"] == "DINOv3ViTModel"
    reader = NuScenesReader(*synthetic_nuscenes)
    scan = reader.scans(SPLIT)[1]
    cached = open_cache(summary.cache_path).read_scan(1)
    teacher = Teacher(TeacherConfig(str(folder), image_size=(64, 112)))
    checked = 0
    for c, frame in enumerate(scan.cameras):
        ours = cached.camera == c
        if not ours.any():
            continue
        image = reader.load_image(frame)
        grid = teacher.patch_grid(image[None])[0]  # (D, 4, 7)
        want = sample_features(grid, cached.uv[ours].astype(np.float64), image.shape[:2])
        got = torch.from_numpy(cached.target[ours].astype(np.float32))
        assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)
        assert want.std(dim=0).mean() > 0.05
        checked += int(ours.sum())
    assert checked > 50


def test_parallel_on_an_existing_cluster_equals_serial_bit_for_bit(serial, tmp_path: Path) -> None:
    """Two worker processes of a cluster we started (reached through --scheduler) give the same
    bytes as one thread worker: scheduling order and worker count do not enter the result."""
    import logging

    from dask.distributed import LocalCluster

    cfg, summary = serial
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster:
        parallel = extract_teacher(
            replace(cfg, cache_root=tmp_path, scheduler=cluster.scheduler_address)
        )
        assert not cluster.scheduler.workers == {}  # the cluster is still ours, still running
    assert Path(parallel.cache_path).name == Path(summary.cache_path).name  # same key
    assert _markers(parallel.cache_path) == _markers(summary.cache_path)
    for a, b in zip(_arrays(parallel.cache_path), _arrays(summary.cache_path), strict=True):
        for name in a:
            assert np.array_equal(a[name], b[name]), name


def test_a_cluster_with_no_worker_yet_is_waited_for_saying_so(
    serial, tmp_path: Path, capfd
) -> None:
    """--scheduler with no worker joined yet: one line says what the run waits for (before, it
    waited silently); a worker joining later does the work, with the same bytes."""
    import logging
    import threading

    from dask.distributed import LocalCluster

    cfg, summary = serial
    with LocalCluster(
        n_workers=0, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        done: list = []
        run = threading.Thread(
            target=lambda: done.append(
                extract_teacher(
                    replace(cfg, cache_root=tmp_path, scheduler=cluster.scheduler_address)
                )
            )
        )
        run.start()
        deadline, said = time.monotonic() + 60, ""
        while "waiting for a worker" not in said and time.monotonic() < deadline:
            time.sleep(0.2)
            said += capfd.readouterr().err
        assert (
            f"waiting for a worker to join the Dask cluster at {cluster.scheduler_address}" in said
        )
        assert f"`PYTHONPATH={REPO} dask worker {cluster.scheduler_address}`" in said
        assert run.is_alive() and not done  # nothing can run yet
        cluster.scale(1)
        run.join(timeout=120)
    assert done and done[0].units_computed == summary.units_computed == summary.units
    assert _markers(done[0].cache_path) == _markers(summary.cache_path)


def test_units_in_parallel_threads_of_one_worker_equal_serial(serial, tmp_path: Path) -> None:
    """--threads-per-worker 2: the two units run at once in one worker, sharing its teacher
    (and, on a GPU, its device): same bytes as one unit at a time."""
    cfg, summary = serial
    two = extract_teacher(replace(cfg, cache_root=tmp_path, threads_per_worker=2))
    assert two.units_computed == 2 and two.teacher_forwards == summary.teacher_forwards
    assert _markers(two.cache_path) == _markers(summary.cache_path)


def _worker_settings() -> tuple[str | None, bool]:
    import dask

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), dask.config.get(
        "distributed.worker.profile.enabled"
    )


def test_local_worker_processes_keep_glibc_malloc_adaptive(serial, monkeypatch) -> None:
    """Our LocalCluster's worker processes start without Dask's MALLOC_TRIM_THRESHOLD_=65536
    (it made every image buffer an mmap + page faults: -40 % images/s, docs/benchmarks.md)
    and without Dask's stack-sampling profiler (GIL time taken from the units)."""
    from pipeline.extract import _client

    cfg, _ = serial
    # as left behind by any earlier default Dask cluster of this process (its nanny's doing)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with _client(replace(cfg, processes=True, n_workers=1)) as client:
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # ours is left as it was
        settings = list(client.run(_worker_settings).values())
    assert settings == [(None, False)]


def test_local_cluster_is_closed_with_the_run(serial, tmp_path: Path) -> None:
    """extract-teacher's own LocalCluster ends with the run: no worker process (each holds a
    teacher, on a GPU node a CUDA context too) outlives it into what the caller does next."""
    import psutil

    cfg, summary = serial

    def workers() -> set[int]:
        return {
            p.pid
            for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())
        }

    before = workers()
    again = extract_teacher(replace(cfg, cache_root=tmp_path, processes=True, n_workers=2))
    assert again.units_computed == summary.units  # the cluster did run units
    assert workers() - before == set()


def test_rerun_does_no_teacher_work(serial) -> None:
    cfg, first = serial
    complete = Path(first.cache_path, "COMPLETE")
    before = (complete.stat().st_mtime_ns, _markers(first.cache_path))
    again = extract_teacher(cfg)
    assert again.cache_path == first.cache_path
    assert again.teacher_forwards == 0 and again.images == 0
    assert again.units_computed == 0 and again.units_skipped == first.units
    assert (complete.stat().st_mtime_ns, _markers(first.cache_path)) == before


def test_same_teacher_in_another_folder_reuses_the_cache(serial, tmp_path: Path) -> None:
    import shutil

    cfg, first = serial
    copy = tmp_path / Path(cfg.teacher).name
    shutil.copytree(cfg.teacher, copy)
    again = extract_teacher(replace(cfg, teacher=str(copy)))
    assert again.cache_path == first.cache_path  # weights hash + folder name, not the full path
    assert again.teacher_forwards == 0


def test_key_names_a_local_teacher_by_its_folder_however_it_is_reached(
    serial, tmp_path: Path, monkeypatch
) -> None:
    cfg, first = serial
    teacher = Path(cfg.teacher)
    monkeypatch.chdir(teacher)
    assert teacher_key_name(".") == teacher_key_name(str(teacher)) == teacher.name
    monkeypatch.setenv("HOME", str(teacher.parent))
    assert teacher_key_name(f"~/{teacher.name}") == teacher.name
    assert teacher_key_name("facebook/dinov2-small") == "facebook/dinov2-small"
    key = open_cache(first.cache_path).key
    assert key.teacher == teacher.name and key.image_decode == "cpu"
    assert key.teacher_weights_dtype == "float32"  # left out of the digest: older caches hold
    assert key.teacher_config_sha256 == Teacher(cfg.teacher_config()).identity.config_sha256


def test_cache_root_is_made_absolute_and_urls_are_refused(serial, monkeypatch) -> None:
    cfg, _ = serial
    monkeypatch.chdir(Path(cfg.cache_root).parent)
    relative = replace(cfg, cache_root=Path(cfg.cache_root).name)
    assert relative.cache_root == Path(cfg.cache_root)  # workers elsewhere see the same path
    with pytest.raises(ValueError, match="s3://bucket/c: URLs are not supported"):
        replace(cfg, cache_root="s3://bucket/c")


def test_other_image_size_makes_a_new_cache_and_leaves_the_old_one(serial) -> None:
    cfg, first = serial
    old = _markers(first.cache_path)
    other = extract_teacher(replace(cfg, image_size=(42, 70), scans_per_unit=2))
    assert other.cache_path != first.cache_path
    assert Path(other.cache_path).parent == Path(first.cache_path).parent
    assert other.teacher_forwards > 0
    assert _markers(first.cache_path) == old
    assert open_cache(other.cache_path).key.image_size == (42, 70)
    assert open_cache(first.cache_path).key.image_size == IMAGE_SIZE


def test_bad_image_size_fails_before_any_work(serial, tmp_path: Path) -> None:
    cfg, _ = serial
    with pytest.raises(ValueError, match="multiple of the teacher's patch size 14"):
        extract_teacher(replace(cfg, cache_root=tmp_path, image_size=(50, 98)))
    assert list(tmp_path.iterdir()) == []


def _cli(cfg: ExtractConfig) -> list[str]:
    """The command line of ``cfg`` (only the options these tests set)."""
    h, w = cfg.image_size
    return [
        sys.executable, str(REPO / "cli.py"), "extract-teacher",
        "--data", str(cfg.data), "--version", cfg.version, "--cache", str(cfg.cache_root),
        "--teacher", cfg.teacher, "--split", cfg.split, "--image-size", f"{h}x{w}",
        "--scans-per-unit", str(cfg.scans_per_unit), "--batch-size", str(cfg.batch_size),
        "--workers", str(cfg.n_workers), "--processes" if cfg.processes else "--threads",
        "--no-progress",
    ]  # fmt: skip


def _wait_for(
    pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 240, count: int = 1
) -> None:
    """Until ``count`` paths match ``pattern`` under ``root``, the process ends, or timeout."""
    deadline = time.monotonic() + timeout
    while (
        len(list(root.glob(pattern))) < count
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(serial, tmp_path: Path) -> None:
    """3 trials: kill -9 the whole CLI process group (client and its Dask worker process) at a
    seeded random moment (trial 0: 0-0.5 s after it takes the lock; then: 0-50 ms after its
    k-th unit, k seeded in 1..3 of 4, so the kill lands inside the run on a fast machine too),
    and re-run. After each kill no unit is marked done without being intact; each
    re-run equals one uninterrupted run, file checksum for file checksum and array for array."""
    from cache.store import unit_problems

    cfg = replace(
        serial[0],
        image_size=(224, 392),
        scans_per_unit=1,
        processes=True,  # a worker process in the killed group, not only the client
    )
    n_units = 4
    fresh = extract_teacher(replace(cfg, processes=False, cache_root=tmp_path / "fresh"))
    assert fresh.units_computed == n_units
    rng = np.random.default_rng(8)
    interrupted = 0
    for trial in range(3):
        root = tmp_path / f"killed{trial}"
        proc = subprocess.Popen(
            _cli(replace(cfg, cache_root=root)),
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if trial == 0:
            _wait_for("*/writer.lock", root, proc)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            _wait_for("*/units/*.done", root, proc, count=int(rng.integers(1, n_units)))
            time.sleep(rng.uniform(0.0, 0.05))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group had already exited
            pass
        output = proc.communicate()[0].decode(errors="replace")
        assert proc.returncode in (-signal.SIGKILL, 0), output  # 0: it finished before the kill
        (path,) = root.iterdir()
        # killed before its end: its lock is left (stale); a run that got to its end (a quiet
        # machine) has written COMPLETE before letting its lock go
        stale = (path / "writer.lock").exists()
        assert stale or (path / "COMPLETE").exists(), output
        manifest = json.loads((path / "manifest.json").read_text())
        done = sorted(path.glob("units/*.done"))
        for marker in done:  # a unit marked done is complete and intact
            u = int(marker.name[1:6])
            assert unit_problems(path, u, manifest["units"][u], checksums=True) == [], marker
        if len(done) < n_units:
            interrupted += 1
            with pytest.raises(IncompleteCacheError):
                open_cache(path)
        # Re-run (in this process, threads: same settings, so same key and, as tested above,
        # the same bytes): takes the stale lock over, skips the finished units, writes the rest.
        with warnings.catch_warnings(record=True) as caught:  # an error inside stays visible
            warnings.simplefilter("always")
            resumed = extract_teacher(replace(cfg, processes=False, cache_root=root))
        if stale:
            assert any("stale lock" in str(w.message) for w in caught), [str(w) for w in caught]
        assert resumed.cache_path == str(path) and Path(fresh.cache_path).name == path.name
        assert resumed.units_skipped == len(done)
        assert resumed.units_computed == n_units - len(done)
        assert open_cache(path).verify(progress=False) == []
        assert _markers(path) == _markers(fresh.cache_path)
        for a, b in zip(_arrays(path), _arrays(fresh.cache_path), strict=True):
            for name in a:
                assert np.array_equal(a[name], b[name]), name
    assert interrupted >= 2  # the kills landed inside the runs, not after them


@pytest.mark.slow
def test_ctrl_c_releases_the_lock_keeps_units_and_says_so(serial, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the CLI's process group) after the first unit: exit 130 with one line
    naming the units kept (no abort from torch threads at interpreter exit), the lock released,
    and a re-run skips the kept units."""
    cfg = replace(serial[0], image_size=(224, 392), scans_per_unit=1, cache_root=tmp_path)
    proc = subprocess.Popen(
        _cli(cfg), cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for("*/units/*.done", tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    (path,) = tmp_path.iterdir()
    done = sorted(path.glob("units/*.done"))
    assert 1 <= len(done) < 4, "not interrupted"
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: ") and line.endswith(
        f"of 4 units are in cache {path} (kept; a unit being written is discarded); the same "
        "command goes on from there"
    ), err
    assert int(line.split()[1]) <= len(done) and "terminate called" not in err
    assert not (path / "writer.lock").exists()
    resumed = extract_teacher(cfg)
    assert (resumed.units_skipped, resumed.units_computed) == (len(done), 4 - len(done))


def test_default_layout_threads_on_cpu_processes_on_a_gpu():
    """What `extract-teacher` runs when no layout option is given (measured: docs/extraction.md)."""
    assert default_layout("cpu", 2) == ClusterLayout(
        workers=2, processes=False, threads_per_worker=1
    )
    assert default_layout("cpu", 64) == ClusterLayout(2, False, 1)
    assert default_layout("cuda", 16) == ClusterLayout(8, True, 2)  # the H200's best (8 x 2)
    assert default_layout("cuda:1", 32) == ClusterLayout(16, True, 2)
    assert default_layout("cuda", 1) == ClusterLayout(1, True, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_work(serial, tmp_path: Path) -> None:
    cfg, _ = serial
    with pytest.raises(ValueError, match="device 'cuda': torch .* has no CUDA"):
        replace(cfg, device="cuda", cache_root=tmp_path)
    replace(cfg, device="cuda", scheduler="tcp://gpu-node:8786")  # its workers may have GPUs
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        replace(cfg, dtype="float16", cache_root=tmp_path)
    cmd = _cli(replace(cfg, cache_root=tmp_path))
    out = subprocess.run([*cmd, "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr  # bad input: 1 (2: typer's usage errors)
    assert "error: device 'cuda'" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_missing_teacher_is_named_not_a_traceback(serial, tmp_path: Path) -> None:
    cfg, _ = serial
    cmd = _cli(replace(cfg, cache_root=tmp_path, teacher=str(tmp_path / "no-teacher")))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"error: teacher '{tmp_path / 'no-teacher'}': no such folder" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_killing_the_only_worker_of_a_cluster_costs_its_unit_only(serial, tmp_path: Path) -> None:
    """kill -9 of the one worker process of an existing cluster (--scheduler) after its first
    unit: its nanny starts a new one, the run goes on there and finishes with every unit once,
    the bytes of an uninterrupted run. (The cache writer and dataset reader the units share used
    to be scattered: the cluster lost them with the worker and the run failed, "cancelled for
    reason: already forgotten".)"""
    import logging

    from dask.distributed import Client, LocalCluster

    cfg = replace(serial[0], image_size=(224, 392), scans_per_unit=1, cache_root=tmp_path / "a")
    fresh = extract_teacher(replace(cfg, cache_root=tmp_path / "fresh"))
    assert fresh.units_computed == 4
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        (pid,) = client.run(os.getpid).values()
        proc = subprocess.Popen(
            [*_cli(cfg), "--scheduler", cluster.scheduler_address],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        _wait_for("*/units/*.done", cfg.cache_root, proc)
        done_at_kill = len(list(cfg.cache_root.glob("*/units/*.done")))
        os.kill(pid, signal.SIGKILL)
        output = proc.communicate(timeout=240)[0]
        assert client.run(os.getpid) != {}  # the nanny's new worker process
    assert 1 <= done_at_kill < 4, "the kill did not land inside the run"
    assert proc.returncode == 0, output[-3000:]
    assert "4 units computed, 0 skipped" in output, output[-3000:]
    (path,) = cfg.cache_root.iterdir()
    assert open_cache(path).verify(progress=False) == []
    assert _markers(path) == _markers(fresh.cache_path)


def _dask(args: list[str], cwd: Path, pythonpath: Path | None, log: Path) -> subprocess.Popen:
    """``dask ARGS`` started as a user would on a node: in ``cwd``, with ``pythonpath`` as its
    PYTHONPATH (none: the project is not importable there), in a process group of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    dask = Path(sys.executable).with_name("dask")
    return subprocess.Popen(
        [str(dask), *args], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def test_a_cluster_without_this_code_is_refused_naming_each_process(serial, tmp_path: Path) -> None:
    """`dask scheduler` started without the project on its import path, one `dask worker`
    running another copy of the code (one constant changed), one running this checkout: the run
    stops before any unit, naming the scheduler (cannot import the packages) and the worker with
    other code (its folder), not the good worker, and says how to start them. (It used to fail
    blaming the teacher, "Error during deserialization of the task graph", and a worker with
    other code wrote units of other bytes into the cache, unnoticed.)"""
    import shutil

    from dask.distributed import Client

    from pipeline.extract import UnitFailedError

    cfg, _ = serial
    other = tmp_path / "other"
    for package in ("pipeline", "cache"):
        shutil.copytree(REPO / package, other / package, ignore=shutil.ignore_patterns("__py*"))
    teacher_py = other / "pipeline" / "teacher.py"
    source = teacher_py.read_text()
    assert "IMAGENET_MEAN = (0.485," in source
    teacher_py.write_text(source.replace("IMAGENET_MEAN = (0.485,", "IMAGENET_MEAN = (0.495,"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    file = tmp_path / "scheduler.json"
    procs = [
        _dask(["scheduler", "--port", "0", "--dashboard-address", ":0", "--scheduler-file",
               str(file)], elsewhere, None, tmp_path / "scheduler.log"),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        for name, path in (("other", other), ("good", REPO)):
            procs.append(
                _dask(["worker", address, "--nworkers", "1", "--nthreads", "1", "--name", name,
                       "--dashboard-address", ":0"], elsewhere, path, tmp_path / f"{name}.log")
            )  # fmt: skip
        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
            workers = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        with pytest.raises(UnitFailedError) as error:
            extract_teacher(replace(cfg, cache_root=tmp_path / "cache", scheduler=address))
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    message = str(error.value)
    assert f"the Dask cluster at {address} does not run this code" in message, message
    assert "scheduler (host " in message and "cannot import pipeline, cache" in message, message
    assert f"worker {workers['other']} (host " in message, message
    assert f"pipeline from {other / 'pipeline'}" in message, message
    assert workers["good"] not in message, message
    assert f"PYTHONPATH={REPO}" in message, message
    assert list(tmp_path.glob("cache/*/units/*")) == []  # no unit started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("decode", ["auto", "device"])
def test_cuda_workers_of_a_cluster_need_no_cuda_on_the_client(
    serial, tmp_path: Path, decode: str
) -> None:
    """`--scheduler ... --device cuda --dtype float16` from a client without CUDA (a head node):
    the client loads the teacher for its identity on the CPU, builds the float16 cache key and
    hands the forwards to the workers. These workers (threads of this CUDA-less process) cannot
    load it there: one line names the worker's error, exit 1. (The client used to load the
    teacher on CUDA itself and died with a traceback, "Torch not compiled with CUDA enabled".)
    Nor does it need torchvision for --image-decode device (the workers decode); "auto", decided
    here without torchvision, is said to mean CPU decoding."""
    import logging

    from dask.distributed import LocalCluster
    from typer.testing import CliRunner

    from cli import app

    cfg, summary = serial
    args = [*_cli(replace(cfg, cache_root=tmp_path))[2:], "--device", "cuda", "--dtype", "float16"]
    args += ["--image-decode", decode]
    with LocalCluster(
        n_workers=1, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        result = CliRunner().invoke(app, [*args, "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"error: a worker could not load teacher '{cfg.teacher}'" in result.output
    assert "Torch not compiled with CUDA enabled" in result.output, result.output
    (path,) = tmp_path.iterdir()
    key = json.loads((path / "manifest.json").read_text())["key"]
    assert key["teacher_dtype"] == "float16"
    assert key.get("image_decode", "cpu") == ("device" if decode == "device" else "cpu")
    said_auto = "--image-decode auto is decided on this client, which has no torchvision"
    assert (said_auto in result.output) == (decode == "auto"), result.output
    assert (
        key["teacher_weights_sha256"] == open_cache(summary.cache_path).key.teacher_weights_sha256
    )
    assert list(path.glob("units/*")) == []


def test_local_cluster_options_with_a_scheduler_are_named_as_ignored(
    serial, tmp_path: Path
) -> None:
    """--workers, --processes/--threads and --threads-per-worker shape our LocalCluster only:
    given with --scheduler they are named as ignored (they used to be dropped silently); the
    run goes on, on the cluster's own workers. Without them, no warning."""
    import logging

    from dask.distributed import LocalCluster
    from typer.testing import CliRunner

    from cli import app

    cfg, summary = serial
    args = _cli(replace(cfg, cache_root=tmp_path))[2:]
    for option in ("--workers", "--threads"):  # _cli gives both: leave them out
        i = args.index(option)
        del args[i : i + (2 if option == "--workers" else 1)]
    with LocalCluster(
        n_workers=1, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        scheduler = ["--scheduler", cluster.scheduler_address]
        layout = ["--workers", "8", "--processes", "--threads-per-worker", "2"]
        first = CliRunner().invoke(app, [*args, *scheduler, *layout])
        again = CliRunner().invoke(app, [*args, *scheduler])
    assert first.exit_code == 0, (first.output, first.exception)
    assert (
        "warning: --workers, --processes, --threads-per-worker set the layout of a LocalCluster: "
        "ignored with --scheduler (the cluster's workers run as `dask worker` started them)"
    ) in first.output, first.output
    assert f"{summary.units} units computed" in first.output
    assert again.exit_code == 0 and "warning: --" not in again.output, again.output
