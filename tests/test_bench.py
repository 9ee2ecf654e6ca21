"""The issue-9 benchmarks (benchmarks/pipeline_bench.py) at their tiniest size: each prints a
table with its expected rows, and every rate and ratio is finite and positive (no timing bounds)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from pipeline_bench import BenchConfig, run_benchmark  # noqa: E402

EXPECTED = {
    "extraction": ["RATIO extract / bare", "share: decode", "share: resize", "share: teacher",
                   "share: pairing", "share: sampling", "share: write",
                   "extract-teacher worker time: teacher", "extract-teacher worker time: image_wait",
                   "during extract-teacher: busy CPU cores (user + system)",
                   "RATIO steady state / bare",
                   "extract-teacher ramp-up + tail (fixed per run: compute s - images / steady rate)"],
    "online": ["train from cache", "train with online teacher", "RATIO cache / online"],
    "loader": ["data_wait_share, 2 loader workers", "RATIO cache / npy throughput"],
    "size": ["D=64: bytes per paired point", "D=64: RATIO dense input / stored",
             "D=64 point-i8: bytes per paired point", "D=64 grid-f16: target bytes per paired point",
             "D=64 grid-f16: RATIO point-f16 / grid-f16 bytes"],
    "scaling": ["extract, 1 worker", "extract, 2 workers", "RATIO 2 workers / 1 worker"],
    "feed": ["RATIO extract / stand-in GPU rate", "extract-teacher, free stand-in (2 thread workers)",
             "CPU side: core-ms per image (cores / free rate)", "stand-in GPU run worker time: teacher",
             "CPU side: busy core-ms per image (measured)"],
}  # fmt: skip


@pytest.mark.parametrize("what", list(EXPECTED))
def test_benchmark_prints_its_table(what, synthetic_nuscenes, tiny_teacher, capsys) -> None:
    cfg = BenchConfig(
        data=synthetic_nuscenes.root, teacher=str(tiny_teacher), split="val", image_size=(28, 56),
        scans=1, steps=1, dim=64, points_per_scan=1500, reads=3, threads=1,
        replicate=2 if what in ("extraction", "feed") else 1,
    )  # fmt: skip
    rows = run_benchmark(what, cfg)
    names = [name for name, _, _ in rows]
    for expected in EXPECTED[what]:
        assert expected in names, f"{what}: row {expected!r} missing from {names}"
    for name, value, unit in rows:
        if unit == "fraction" and name.startswith("data_wait"):
            assert 0 <= value < 1, (name, value)  # a wait share may be 0
        elif name.startswith("extract-teacher ramp-up"):
            assert value == 0.0, (name, value)  # < 10 units: the steady rate is the run's rate
        elif name.startswith("during extract-teacher: ") and "busy CPU" not in name:
            assert math.isfinite(value) and value >= 0, (name, value)  # tmpfs writes no disk
        else:
            assert math.isfinite(value) and value > 0, (name, value)
    shares = [v for n, v, _ in rows if n.startswith("share: ")]
    if shares:
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)
    if what == "extraction":  # --replicate 2: extract-teacher ran on both copies of the split
        table = {n: v for n, v, _ in rows}
        assert table["extract-teacher images"] == 2 * 6 * 4
        bare = table["bare teacher forward (resized input), best of both"]
        assert bare == max(
            table["bare teacher forward, before extract"],
            table["bare teacher forward, after extract"],
        )  # a slow moment of the machine in one measurement cannot raise the ratio
    worker = [
        v
        for n, v, _ in rows
        if n.startswith(("extract-teacher worker time: ", "stand-in GPU run worker time: "))
    ]
    if worker:
        assert math.isclose(sum(worker), 1.0, rel_tol=1e-6)
    from pipeline.teacher import Teacher

    assert Teacher.patch_grid.__name__ == "patch_grid"  # feed's stand-in GPU did not leak
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"## {what}")
    header = out.splitlines()[1]
    assert [c.strip() for c in header.split("|")] == ["measure", "value", "unit"]
    for name in EXPECTED[what]:
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert re.fullmatch(r".* \| +[-+0-9.e]+ \| \S+", line), line


@pytest.mark.parametrize("image_decode", ["cpu", "device"])
def test_feed_with_worker_processes(synthetic_nuscenes, tiny_teacher, image_decode: str) -> None:
    """The stand-in GPU reaches spawned worker processes (Dask preload): their forwards are
    the stand-in's: 24 images through one stand-in GPU at 10 images/s take >= 2.4 s, whereas
    the real tiny teacher at 28x56 runs the split several times faster. With image_decode
    "device" the stand-in decodes too: without it the workers would need torchvision and a GPU."""
    cfg = BenchConfig(
        data=synthetic_nuscenes.root, teacher=str(tiny_teacher), split="val", image_size=(28, 56),
        scans=1, threads=1, workers=2, processes=True, gpu_rate=10.0, image_decode=image_decode,
    )  # fmt: skip
    rows = {name: value for name, value, _ in run_benchmark("feed", cfg)}
    assert 0 < rows["RATIO extract / stand-in GPU rate"] <= 1.0
    assert rows["images per run"] == 6 * 4


def test_machine_load_window_arithmetic() -> None:
    """Averages over a window are counter differences over its length: 3 s of CPU busy and
    1 s in iowait in 1.5 s are 2 and 0.67 cores; 300 MB and 1.2 s busy of 2 disks in 1.5 s."""
    from machine_load import Counters, window_rows

    a = Counters(t=10.0, cpu_busy_s=100.0, cpu_iowait_s=5.0, disk_write_bytes=0, disk_busy_ms=0)
    b = Counters(t=11.5, cpu_busy_s=103.0, cpu_iowait_s=6.0, disk_write_bytes=300_000_000,
                 disk_busy_ms=1200)  # fmt: skip
    rows = {name: value for name, value, _ in window_rows(a, b, disks=2)}
    assert rows["busy CPU cores (user + system)"] == pytest.approx(2.0)
    assert rows["cores idle waiting on I/O"] == pytest.approx(2 / 3)
    assert rows["disk writes (whole disks)"] == pytest.approx(200.0)
    assert rows["disk busy (mean over whole disks)"] == pytest.approx(0.4)


def test_machine_load_sees_a_busy_core() -> None:
    """A thread spinning for 0.6 s is at least half a busy core in the sampler's window."""
    import time

    from machine_load import LoadSampler

    with LoadSampler(interval=0.05) as load:
        t0 = time.time()
        while time.time() - t0 < 0.6:
            pass
        t1 = time.time()
    rows = {name: value for name, value, _ in load.rows(t0, t1)}
    assert len(load.samples) >= 5
    assert rows["busy CPU cores (user + system)"] >= 0.5
    assert load.busy_cores(t0, t1) == rows["busy CPU cores (user + system)"]
    assert rows["logical CPU cores of the machine"] >= 1


def test_fixed_seconds_of_a_run() -> None:
    """A run's seconds beyond its steady rate (ramp-up + tail): 3,000 images at a steady 300
    images/s in 12 s leave 2 s fixed; a run faster than its steady rate leaves none."""
    from pipeline_bench import _fixed_seconds

    assert _fixed_seconds(12.0, 3000, 300.0) == pytest.approx(2.0)
    assert _fixed_seconds(9.0, 3000, 300.0) == 0.0
    assert _fixed_seconds(1.0, 0, 0.0) == 0.0


def test_scaling_compares_one_two_and_the_asked_workers(synthetic_nuscenes, tiny_teacher) -> None:
    """`bench scaling --workers 3` (a GPU node's 8 in real use): extraction with 1, 2 and 3
    workers of the asked layout, each ratio to 1 worker its rates' quotient."""
    cfg = BenchConfig(
        data=synthetic_nuscenes.root, teacher=str(tiny_teacher), split="val", image_size=(28, 56),
        scans=1, threads=1, workers=3,
    )  # fmt: skip
    rows = {name: value for name, value, _ in run_benchmark("scaling", cfg)}
    assert list(rows) == [
        "extract, 1 worker", "extract, 2 workers", "extract, 3 workers",
        "RATIO 2 workers / 1 worker", "RATIO 3 workers / 1 worker",
    ]  # fmt: skip
    for n in (2, 3):
        ratio = rows[f"extract, {n} workers"] / rows["extract, 1 worker"]
        assert rows[f"RATIO {n} workers / 1 worker"] == pytest.approx(ratio)
        assert math.isfinite(ratio) and ratio > 0
