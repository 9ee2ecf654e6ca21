"""Measure cache layouts: bytes/point, write MB/s, random scan read ms per codec and chunk size.

    python benchmarks/cache_layout.py [--scans-per-unit 8] [--dim 384] [--dir /tmp]

Synthetic units shaped like nuScenes (~34.7k points per sweep) with DINOv2-like targets:
normal fp16 features on paired points, zero rows on unpaired ones (in runs, as a spinning lidar
sweeps in and out of camera views), points/uv/camera/label with realistic value ranges. Reads
come from the page cache (we cannot drop caches without root): they measure decode + Zarr cost,
which is what a training node with warm storage pays.

Columns: bytes/pt = stored bytes per point (all arrays); ratio = dense input bytes / stored bytes;
write MB/s = dense input bytes (what the pipeline hands over) per second of `write_unit_group`,
median of repeated writes; scan read ms = median of random `CacheReader.read_scan` calls
(5 Zarr reads + scattering `target` back to all points).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import open_cache  # noqa: E402
from cache.schema import OFFSETS, TARGET_FORMATS, CacheKey, UnitData  # noqa: E402
from cache.store import CacheWriter, StorageLayout, write_unit_group  # noqa: E402

POINTS_PER_SCAN = 34_700  # nuScenes LIDAR_TOP sweep
PAIRED_SHARE = 0.5  # rough share of nuScenes points seen by one of the six cameras

LAYOUTS = {
    "none, chunk 16k (default)": StorageLayout(),
    "none, chunk 4k": StorageLayout(chunk_rows=4096),
    "none, chunk 64k": StorageLayout(chunk_rows=65536),
    "zstd-1 all": StorageLayout(target_codec="zstd", other_codec="zstd"),
    "blosc target, none others": StorageLayout(target_codec="blosc"),
    "none target, zstd others": StorageLayout(other_codec="zstd"),
}


def synthetic_unit(
    rng: np.random.Generator,
    tokens: list[str],
    dim: int,
    points: int = POINTS_PER_SCAN,
) -> UnitData:
    """A unit of scans of ~``points`` points (default nuScenes-sized) with DINOv2-like targets
    (see module docstring)."""
    pts, tgt, cam, uv, lab = [], [], [], [], []
    for _ in tokens:
        spread = min(2000, points // 16)
        n = int(rng.integers(points - spread, points + spread))
        runs = rng.geometric(1 / 200, size=n // 50 + 10)  # runs of in/out of camera views
        paired = np.repeat(np.arange(len(runs)) % 2 == 0, runs)[:n]
        paired = paired if rng.random() < PAIRED_SHARE else ~paired
        camera = np.where(paired, np.repeat(rng.integers(0, 6, len(runs)), runs)[:n], -1)
        xyz = rng.normal(0, 15, (n, 3)).astype(np.float32)
        intensity = rng.integers(0, 100, (n, 1)).astype(np.float32)
        pts.append(np.concatenate([xyz, intensity], axis=1))
        t = rng.normal(0, 1, (n, dim)).astype(np.float16)
        t[~paired] = 0
        tgt.append(t)
        cam.append(camera.astype(np.int8))
        uv.append(np.where(paired[:, None], rng.uniform(0, 1600, (n, 2)), 0).astype(np.float32))
        lab.append(rng.integers(0, 17, n).clip(0, 16).astype(np.uint8))
    return UnitData(
        tokens=tokens,
        lidar_paths=[f"/data/{t}.pcd.bin" for t in tokens],
        points=pts,
        target=tgt,
        camera=cam,
        uv=uv,
        label=lab,
    )


def add_grids(rng: np.random.Generator, data: UnitData, grid: tuple[int, int]) -> UnitData:
    """``data`` with the (h, w) = ``grid`` patch grids (normal fp16) of 6 cameras of 1600x900
    per scan, so it can be written in every target format (grid-f16 too)."""
    dim = data.target[0].shape[1]
    data.grids = [rng.normal(0, 1, (6, *grid, dim)).astype(np.float16) for _ in data.tokens]
    data.image_sizes = [np.array([[900, 1600]] * 6) for _ in data.tokens]
    return data


def raw_bytes(data: UnitData) -> int:
    return sum(
        a.nbytes
        for name in ("points", "target", "camera", "uv", "label")
        for a in getattr(data, name)
    )


def measure(
    name: str,
    layout: StorageLayout,
    units: list[UnitData],
    workdir: Path,
    reads: int,
    repeats: int,
    seed: int,
    target_format: str = "point-f16",
) -> dict:
    key = CacheKey(
        "bench", "train", name, "", (224, 448), "last", "{}", target_format=target_format
    )
    dim = units[0].target[0].shape[1]
    writer = CacheWriter.create(workdir, key, [u.tokens for u in units], dim, {}, layout=layout)
    # Write: the Zarr group alone (what the layout changes); median of `repeats` per unit,
    # after one untimed warm-up write.
    times = []
    for i, data in enumerate(units):
        for r in range(repeats + (i == 0)):
            scratch = workdir / f"scratch-{i}-{r}"
            t0 = time.perf_counter()
            write_unit_group(scratch, data, dim, layout, target_format)
            if r > 0 or i > 0:
                times.append(time.perf_counter() - t0)
            shutil.rmtree(scratch)
        writer.write_unit(i, data)
    writer.finalize({})
    reader = open_cache(writer.path)
    stored = reader.info()["bytes_on_disk"]
    spec = TARGET_FORMATS[target_format]
    target_files = [  # the target format's arrays alone (metadata included)
        f
        for name in (*spec.row_arrays, *spec.index_arrays)
        if name != OFFSETS
        for f in writer.path.glob(f"units/u*/{name}/**/*")
        if f.is_file()
    ]
    points = sum(sum(u.rows()) for u in units)
    rng = np.random.default_rng(seed)
    order = rng.integers(0, len(reader), reads)
    for i in range(len(units)):  # open every unit first: measure steady-state reads
        reader.num_points(i * len(units[0].tokens))
    read_s = []  # seconds per scan; medians are robust to a busy machine
    for i in order:
        t0 = time.perf_counter()
        reader.read_scan(int(i))
        read_s.append(time.perf_counter() - t0)
    mb = np.mean([raw_bytes(u) for u in units]) / 1e6
    return {
        "bytes/point": stored / points,
        "target bytes/point": sum(f.stat().st_size for f in target_files) / points,
        "ratio": sum(raw_bytes(u) for u in units) / stored,
        "write MB/s": [mb / t for t in times],
        "scan read ms": [t * 1e3 for t in read_s],
    }


def main(
    scans_per_unit: int = typer.Option(8, help="Scans per unit."),
    units: int = typer.Option(2, help="Units per layout."),
    dim: int = typer.Option(384, help="Feature dim (384 = ViT-S/14, 768 = ViT-B/14)."),
    reads: int = typer.Option(60, help="Random scan reads per layout."),
    repeats: int = typer.Option(3, help="Timed writes per unit."),
    dir: Path = typer.Option(
        Path(tempfile.gettempdir()), help="Scratch folder (its disk is measured)."
    ),
    rounds: int = typer.Option(3, help="Rounds over all layouts (spreads a busy machine's noise)."),
    seed: int = typer.Option(0),
) -> None:
    """Print a table comparing the layouts in LAYOUTS (medians over all rounds)."""
    rng = np.random.default_rng(seed)
    data = [
        synthetic_unit(rng, [f"s{u}_{j}" for j in range(scans_per_unit)], dim) for u in range(units)
    ]
    raw = raw_bytes(data[0]) / sum(data[0].rows())
    print(
        f"{units} units x {scans_per_unit} scans x ~{POINTS_PER_SCAN} points, D={dim}; "
        f"raw {raw:.0f} bytes/point; paired ~{PAIRED_SHARE:.0%}"
    )
    print(
        f"{'layout':36s} {'bytes/pt':>9s} {'ratio':>6s} {'write MB/s':>11s} {'scan read ms':>13s}"
    )
    results: dict[str, dict] = {}
    for r in range(rounds):
        for name, layout in LAYOUTS.items():
            workdir = Path(tempfile.mkdtemp(dir=dir, prefix="cache-bench-"))
            try:
                m = measure(name, layout, data, workdir, reads, repeats, seed + r)
            finally:
                shutil.rmtree(workdir)
            if name not in results:
                results[name] = m
            else:
                results[name]["write MB/s"] += m["write MB/s"]
                results[name]["scan read ms"] += m["scan read ms"]
    for name, m in results.items():
        print(
            f"{name:36s} {m['bytes/point']:9.0f} {m['ratio']:6.2f} "
            f"{np.median(m['write MB/s']):11.0f} {np.median(m['scan read ms']):13.1f}"
        )


if __name__ == "__main__":
    typer.run(main)
